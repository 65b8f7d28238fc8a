#!/usr/bin/env bash
# Thread scaling of the C-JEPA training step: `cjepa bench train-step` on 1 thread and on THREADS
# threads, alternated ROUNDS times (so a change of machine load hits both), and the ratio of the
# mean images/s. With TORCH=1 the PyTorch twin (`bench/torch_step.py`, same masks) is measured the
# same way, for reference.
#
#   bench/scaling.sh                                   # vit_small, 224 px, batch 8, 1 vs 2 threads
#   MODEL=quick BATCH=32 STEPS=4 ROUNDS=3 bench/scaling.sh
#
# Environment: MODEL (vit_small), BATCH (8), STEPS (2), WARMUP (1), THREADS (2), ROUNDS (2),
# SHARDS (auto, passed to --shards at THREADS threads), TORCH (0), CJEPA_BIN, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-vit_small}
BATCH=${BATCH:-8}
STEPS=${STEPS:-2}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
SHARDS=${SHARDS:-auto}
TORCH=${TORCH:-0}
PYTHON=${PYTHON:-python3}
BIN=${CJEPA_BIN:-target/release/cjepa}

if [ ! -x "$BIN" ]; then
    cargo build --release --bin cjepa
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

run_candle() { # threads shards out
    RAYON_NUM_THREADS=$1 "$BIN" bench train-step --model "$MODEL" --batch "$BATCH" \
        --steps "$STEPS" --warmup "$WARMUP" --threads "$1" --fused on --shards "$2" \
        --masks-out "$tmp/masks.json" | grep "^RESULT" | tee -a "$3"
}
run_torch() { # threads out
    OMP_NUM_THREADS=$1 MKL_NUM_THREADS=$1 "$PYTHON" bench/torch_step.py \
        --masks "$tmp/masks.json" --steps "$STEPS" --warmup "$WARMUP" --threads "$1" |
        grep "^RESULT" | tee -a "$2"
}

for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round / $ROUNDS"
    run_candle 1 1 "$tmp/c1.txt"
    run_candle "$THREADS" "$SHARDS" "$tmp/cn.txt"
    if [ "$TORCH" = 1 ]; then
        run_torch 1 "$tmp/t1.txt"
        run_torch "$THREADS" "$tmp/tn.txt"
    fi
done

mean_ips() {
    sed -n 's/.* images_per_s=\([^ ]*\).*/\1/p' "$1" |
        awk '{ s += $1; n += 1 } END { if (n) printf "%.4f", s / n; else print "nan" }'
}
echo
echo "== $MODEL, batch $BATCH, 1 vs $THREADS threads, $ROUNDS round(s) of $STEPS steps"
c1=$(mean_ips "$tmp/c1.txt")
cn=$(mean_ips "$tmp/cn.txt")
awk -v a="$c1" -v b="$cn" -v t="$THREADS" 'BEGIN {
    printf "candle: %.3f -> %.3f images/s, scaling %.2fx (goal >= 1.8x for 2 threads)\n", a, b, b / a }'
if [ "$TORCH" = 1 ]; then
    t1=$(mean_ips "$tmp/t1.txt")
    tn=$(mean_ips "$tmp/tn.txt")
    awk -v a="$t1" -v b="$tn" 'BEGIN {
        printf "pytorch: %.3f -> %.3f images/s, scaling %.2fx\n", a, b, b / a }'
fi
