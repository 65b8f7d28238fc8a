#!/usr/bin/env bash
# The GPU checks of a CUDA build of cjepa, in one run (under ten minutes on one H100 / H200),
# ending with one table. RUN IT ON A MACHINE WITH AN NVIDIA GPU (driver 580 = CUDA 13.0 or newer).
#
# Binaries: built on a machine without a GPU by `CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh`, which
# leaves target/cuda/release/{cjepa,it-cuda}; `scripts/gpu-pack.sh` packs them into .gpu/ (gzip)
# for a machine that has no Rust toolchain, and this script unpacks .gpu/*.gz when it finds them.
#
# Checks (each with its own time limit, so one hang cannot eat the run):
#   golden-f32     golden model tests (`golden_model`: forward, every gradient, AdamW, EMA, one full
#                  step against the official PyTorch numbers) on the GPU in f32
#   golden-bf16    one full step with bf16 autocast against the official f32 step (bf16 tolerances)
#   every-kind     pipelines/examples/every_kind_tiny.yaml with --device cuda: every stage kind, a
#                  few steps each; it must finish
#   quickstart     the quickstart's two pretraining stages on the GPU (steps/s)
#   bench-f32      `bench train-step` ViT-B/16 224 px batch 64 in f32 (TF32 matmuls): images/s, MFU,
#                  and the speed-up of our CUDA kernels over candle's ops alone (same process)
#   bench-bf16     the same with --precision bf16
#   nccl-world1    an NCCL all-reduce over a world of one on cuda:0
#   nccl-2ranks    a `resources: { ranks: 2 }` pretrain stage on the one GPU (two processes joined by
#                  NCCL); NCCL refuses two ranks on one device on most versions, which is reported
#                  as SKIP with NCCL's message, not as a failure
# Output: one line per check, `CHECK <name> <PASS|FAIL|SKIP> <seconds> <figure>`, then the table.
# MFU is of the dense bf16 peak of the device (H100/H200 SXM: 989.4 TFLOP/s).
#
# Usage: scripts/gpu-check.sh [--quick] [CHECK ...]   (--quick: 2 timed bench steps instead of 5;
#        CHECK names run only those checks)
# Environment: CJEPA_CUDA_TARGET (default target/cuda), GPU (default cuda:0), BENCH_ARGS.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CJEPA_CUDA_TARGET:-$repo/target/cuda}"
gpu="${GPU:-cuda:0}"
steps=5
only=()
for a in "$@"; do
  case "$a" in
    --quick) steps=2 ;;
    *) only+=("$a") ;;
  esac
done
say() { printf '\n[gpu-check] %s\n' "$*" >&2; }
work="${TMPDIR:-/tmp}/cjepa-gpu-check"
rm -rf "$work" && mkdir -p "$work"

command -v nvidia-smi >/dev/null || { say "no nvidia-smi: this script needs a GPU machine"; exit 2; }
device_name=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n1)
say "device: $device_name"

# CUDA 13 runtime libraries: the preinstalled PyTorch's wheels, or $CUDA_HOME/lib
libs=()
if py=$(command -v python3); then
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for d in "$site/nvidia/cu13/lib" "$site/nvidia/nccl/lib"; do [[ -d "$d" ]] && libs+=("$d"); done
fi
[[ -n "${CUDA_HOME:-}" && -d "$CUDA_HOME/lib" ]] && libs+=("$CUDA_HOME/lib")
[[ ${#libs[@]} -gt 0 ]] || say "warning: no CUDA 13 library folder found; relying on the system's"
export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# binaries: packed ones first, then a build folder, else build with cargo
if compgen -G "$repo/.gpu/*.gz" >/dev/null; then
  mkdir -p "$work/bin"
  for f in "$repo"/.gpu/*.gz; do gzip -dc "$f" >"$work/bin/$(basename "$f" .gz)"; done
  chmod +x "$work/bin"/*
  cjepa="$work/bin/cjepa" tests="$work/bin/it-cuda"
else
  cjepa="$target/release/cjepa" tests="$target/release/it-cuda"
fi
if [[ ! -x "$cjepa" || ! -x "$tests" ]]; then
  command -v cargo >/dev/null && command -v nvcc >/dev/null ||
    { say "missing $cjepa or $tests, and no cargo + nvcc to build them: run CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh and scripts/gpu-pack.sh on a build machine"; exit 2; }
  (cd "$repo" && CJEPA_CUDA_TESTS=1 CJEPA_CUDA_TARGET="$target" bash scripts/build-cuda.sh) || exit 2
fi

rows=()
failed=0
want() { [[ ${#only[@]} -eq 0 ]] || [[ " ${only[*]} " == *" $1 "* ]]; }
# record NAME STATUS SECONDS FIGURE
record() {
  printf 'CHECK %s %s %s %s\n' "$1" "$2" "$3" "$4"
  rows+=("$(printf '| %-12s | %-4s | %6s | %s |' "$1" "$2" "$3" "$4")")
  [[ "$2" == FAIL ]] && failed=1
  return 0
}
# CJEPA_CHECK_BUDGET: seconds for all checks together (default 540); each check's limit is cut
# to what is left, so the table always prints
budget_end=$((SECONDS + ${CJEPA_CHECK_BUDGET:-540}))
# check NAME LIMIT_S CMD...: runs CMD with a time limit, its output in $work/NAME.log
check() {
  local name=$1 limit=$2; shift 2
  local left=$((budget_end - SECONDS - 5))
  (( left < limit )) && limit=$left
  if (( limit < 5 )); then
    echo "no time left in the check budget" >"$work/$name.log"
    last_rc=124 last_dt=0
    return 124
  fi
  say "$name: $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  local rc=$?
  last_rc=$rc last_dt=$((SECONDS - t0))
  tail -n 15 "$work/$name.log" >&2
  [[ $rc -eq 124 || $rc -eq 137 ]] && say "$name: timed out after ${limit} s"
  return $rc
}

cd "$repo"
if want golden-f32; then
  if check golden-f32 90 env CJEPA_TEST_DEVICE="$gpu" CJEPA_GOLDEN_DIR="$repo/tests/golden" \
      "$tests" golden_model --test-threads 1; then
    record golden-f32 PASS "$last_dt" "$(grep -o '[0-9]* passed' "$work/golden-f32.log" | tail -n1)"
  else record golden-f32 FAIL "$last_dt" "rc $last_rc, see $work/golden-f32.log"; fi
fi
if want golden-bf16; then
  if check golden-bf16 90 env CJEPA_TEST_DEVICE="$gpu" \
      CJEPA_GOLDEN_DIR="$repo/tests/golden" "$tests" golden_model_train_step_bf16 --test-threads 1 --nocapture; then
    record golden-bf16 PASS "$last_dt" "$(grep -o '[0-9]* passed' "$work/golden-bf16.log" | tail -n1)"
  else record golden-bf16 FAIL "$last_dt" "rc $last_rc, see $work/golden-bf16.log"; fi
fi
if want every-kind; then
  if check every-kind 150 "$cjepa" run pipelines/examples/every_kind_tiny.yaml --device "$gpu" -j 4 \
      --store "$work/store-every" --plain; then
    record every-kind PASS "$last_dt" "all stages finished"
  else record every-kind FAIL "$last_dt" "rc $last_rc: $(grep -i 'error\|failed' "$work/every-kind.log" | head -n2 | tr '\n' ' ' | cut -c1-160)"; fi
fi
if want quickstart; then
  if check quickstart 150 "$cjepa" run pipelines/quickstart.yaml --only pretrain --device "$gpu" \
      --store "$work/store-quick" --plain; then
    record quickstart PASS "$last_dt" "$(grep '^done *pretrain' "$work/quickstart.log" | sed -n 's/^done *\(pretrain[^ ]*\) in \([^ ]*\).*images_per_sec=\([0-9.]*\).*/\1 \2 \3 img\/s;/p' | tr '\n' ' ')"
  else record quickstart FAIL "$last_dt" "rc $last_rc: $(grep -i 'error\|failed' "$work/quickstart.log" | head -n2 | tr '\n' ' ' | cut -c1-160)"; fi
fi
bench() {
  local name=$1 prec=$2
  # shellcheck disable=SC2086
  if check "$name" 120 "$cjepa" bench train-step --model vit_base --img 224 --batch 64 --device "$gpu" \
      --steps "$steps" --warmup 2 --peak-tflops 989.4 ${prec:+--precision $prec} ${BENCH_ARGS:-}; then
    local line ips mfu
    line=$(grep '^RESULT impl=candle-cuda-kernels' "$work/$name.log" | tail -n1)
    ips=$(sed -n 's/.*images_per_s=\([^ ]*\).*/\1/p' <<<"$line")
    mfu=$(sed -n 's/.*mfu=\([^ ]*\).*/\1/p' <<<"$line")
    local ratio
    ratio=$(sed -n 's/.*fused\/unfused speed: \([0-9.]*x\) (wall).*/\1/p' "$work/$name.log" | tail -n1)
    record "$name" PASS "$last_dt" "ViT-B/16 224 px b64: $ips images/s, MFU $(awk -v m="$mfu" 'BEGIN{printf "%.1f%%", 100*m}'), ${ratio:-?} of candle's ops alone; $(grep 'phases:' "$work/$name.log" | head -n1 | sed 's/^ *//')"
  else record "$name" FAIL "$last_dt" "rc $last_rc: $(tail -n2 "$work/$name.log" | tr '\n' ' ' | cut -c1-160)"; fi
}
want bench-f32 && bench bench-f32 ""
want bench-bf16 && bench bench-bf16 bf16
if want nccl-world1; then
  if check nccl-world1 60 env CJEPA_TEST_DEVICE="$gpu" "$tests" nccl_world_of_one --test-threads 1; then
    if grep -q '1 passed' "$work/nccl-world1.log"; then record nccl-world1 PASS "$last_dt" "all-reduce of a world of one"
    else record nccl-world1 FAIL "$last_dt" "the test did not run (built without nccl?)"; fi
  else record nccl-world1 FAIL "$last_dt" "rc $last_rc, see $work/nccl-world1.log"; fi
fi
if want nccl-2ranks; then
  mkdir -p "$work/dp"
  cat >"$work/dp/p.yaml" <<'EOF'
name: dp
defaults: { seed: 0, device: cuda }
stages:
  data:
    kind: dataset
    source: synth
    format: imagefolder
    params: { classes: 4, train_per_class: 8, val_per_class: 2, size: 32 }
  one:
    kind: pretrain
    needs: [data]
    model: &m { preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }
    params: &p { method: cjepa, epochs: 1, batch: 8, warmup_epochs: 1, log_every: 1, checkpoint_every: 4 }
  two:
    kind: pretrain
    needs: [data]
    model: *m
    params: *p
    resources: { ranks: 2 }
EOF
  if check nccl-2ranks 90 env NCCL_DEBUG=WARN "$cjepa" run "$work/dp/p.yaml" --store "$work/dp/store" --plain; then
    loss_of() {
      local key
      key=$("$cjepa" ls --store "$work/dp/store" 2>/dev/null | awk -v id="dp/$1" '$4 == id {print $1; exit}')
      "$cjepa" show --store "$work/dp/store" "$key" 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["metrics"]["loss"])' 2>/dev/null
    }
    a=$(loss_of one) b=$(loss_of two)
    if [[ -n "$a" && -n "$b" ]] && awk -v a="$a" -v b="$b" 'BEGIN{d=a-b; if(d<0)d=-d; exit !(d <= 1e-3*(a<0?-a:a)+1e-6)}'; then
      record nccl-2ranks PASS "$last_dt" "final loss 1 rank $a, 2 ranks $b (equal within 1e-3)"
    else
      record nccl-2ranks FAIL "$last_dt" "final loss 1 rank ${a:-?}, 2 ranks ${b:-?}: not equal within 1e-3"
    fi
  elif [[ "$(nvidia-smi -L | wc -l)" -lt 2 ]] && grep -q 'ncclCommInitRank' "$work/nccl-2ranks.log"; then
    tail -n 5 "$work"/dp/store/work/*/stage.log >>"$work/nccl-2ranks.log" 2>/dev/null
    record nccl-2ranks SKIP "$last_dt" "one GPU: NCCL refuses two ranks on the same device (ncclCommInitRank fails); nccl-world1 checked NCCL itself"
  else record nccl-2ranks FAIL "$last_dt" "rc $last_rc: $(grep -i 'error' "$work/nccl-2ranks.log" | head -n2 | tr '\n' ' ' | cut -c1-160)"; fi
fi

printf '\n## gpu-check on %s (%s)\n\n' "$device_name" "$(date -u +%Y-%m-%dT%H:%MZ)"
printf '| check        | ok   |    s   | figure |\n|---|---|---|---|\n'
printf '%s\n' "${rows[@]}"
# CJEPA_CHECK_LOGS=DIR: every check's log, packed in DIR/gpu-check-logs.tgz
if [[ -n "${CJEPA_CHECK_LOGS:-}" ]]; then tar czf "$CJEPA_CHECK_LOGS/gpu-check-logs.tgz" -C "$work" $(cd "$work" && ls *.log); fi
exit $failed
