#!/usr/bin/env bash
# Runs the C-JEPA training step in candle (`cjepa bench train-step`) and in PyTorch
# (`bench/torch_step.py`) on the same machine, with the same threads, architecture, batch and the
# very same masks (cjepa writes them, the twin replays them), and prints the speed ratio and both
# peak memories. Rounds alternate candle and PyTorch, so a change of machine load hits both.
#
#   bench/compare.sh                                  # vit_small, 224 px, batch 8
#   MODEL=quick BATCH=32 bench/compare.sh             # the quickstart's small model, 64 px
#   THREADS=1 STEPS=2 ROUNDS=2 bench/compare.sh
#
# Environment: MODEL (vit_small), IMG (preset's), BATCH (8), STEPS (3), WARMUP (1),
# THREADS (nproc), ROUNDS (1), FUSED (on; `both` also times candle's unfused path),
# SHARDS (auto: candle trains the batch as one shard per thread, see `cjepa bench train-step
# --help`; 1 = one batch, its matrix products split over the threads),
# ATTN (manual = the official attention code; sdpa = torch's fused attention),
# CJEPA_BIN (target/release/cjepa, built when missing), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-vit_small}
BATCH=${BATCH:-8}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-1}
FUSED=${FUSED:-on}
SHARDS=${SHARDS:-auto}
ATTN=${ATTN:-manual}
PYTHON=${PYTHON:-python3}
BIN=${CJEPA_BIN:-target/release/cjepa}

if [ ! -x "$BIN" ]; then
    cargo build --release --bin cjepa
fi
"$PYTHON" -c "import torch" 2>/dev/null || {
    echo "compare.sh: PyTorch is not installed for $PYTHON (pip install torch numpy)" >&2
    exit 2
}

export RAYON_NUM_THREADS=$THREADS
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

img_args=()
if [ -n "${IMG:-}" ]; then img_args=(--img "$IMG"); fi

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round / $ROUNDS: candle"
    "$BIN" bench train-step --model "$MODEL" "${img_args[@]}" --batch "$BATCH" \
        --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --fused "$FUSED" --shards "$SHARDS" \
        --masks-out "$tmp/masks.json" | tee -a "$tmp/candle.txt"
    echo "== round $round / $ROUNDS: pytorch"
    "$PYTHON" bench/torch_step.py --masks "$tmp/masks.json" --steps "$STEPS" \
        --warmup "$WARMUP" --threads "$THREADS" --attn "$ATTN" | tee -a "$tmp/torch.txt"
done

# mean of a RESULT field over the rounds for one implementation
field() {
    grep -h "^RESULT impl=$1 " "$tmp"/*.txt |
        sed -n "s/.* $2=\([^ ]*\).*/\1/p" |
        awk '{ s += $1; n += 1 } END { if (n) printf "%.4f", s / n; else print "nan" }'
}

c_ips=$(field candle-fused images_per_s)
c_mem=$(field candle-fused peak_rss_mib)
t_ips=$(field "torch-$ATTN" images_per_s)
t_mem=$(field "torch-$ATTN" peak_rss_mib)
echo
echo "== $MODEL, batch $BATCH, $THREADS threads, $ROUNDS round(s) of $STEPS steps"
printf "candle fused:   %8.3f images/s, peak RSS %6.0f MiB\n" "$c_ips" "$c_mem"
if grep -q "^RESULT impl=candle-unfused " "$tmp/candle.txt"; then
    printf "candle unfused: %8.3f images/s, peak RSS %6.0f MiB\n" \
        "$(field candle-unfused images_per_s)" "$(field candle-unfused peak_rss_mib)"
fi
printf "pytorch (%s): %8.3f images/s, peak RSS %6.0f MiB\n" "$ATTN" "$t_ips" "$t_mem"
awk -v c="$c_ips" -v t="$t_ips" -v cm="$c_mem" -v tm="$t_mem" 'BEGIN {
    printf "speed ratio candle/pytorch: %.2fx (goal >= 1.2x)\n", c / t
    printf "peak memory candle/pytorch: %.2fx (goal <= 1.0x)\n", cm / tm
}'
