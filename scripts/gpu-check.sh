#!/usr/bin/env bash
# GPU checks of a CUDA build of cjepa. RUN IT ON A MACHINE WITH AN NVIDIA GPU (H100 / H200,
# driver 580 = CUDA 13.0 or newer). It cannot run on the build machines (no GPU there); it has
# not been run by the commit that added it.
#
# What it does:
#   1. finds the CUDA 13 runtime libraries (the preinstalled PyTorch's site-packages/nvidia/cu13/lib
#      and nvidia/nccl/lib, or $CUDA_HOME/lib) and puts them on LD_LIBRARY_PATH;
#   2. golden model tests on the GPU: the integration tests `golden_model` with
#      CJEPA_TEST_DEVICE=cuda:0 (forward, losses, every gradient, AdamW, EMA, one full step against
#      the official PyTorch numbers, with the tolerances of tests/golden/model/README.md);
#   3. `cjepa bench train-step --model vit_base --img 224 --batch 64 --device cuda:0`: images/s and
#      model FLOP utilisation (of the H100 dense bf16 peak, 989.4 TFLOP/s; the step runs in f32).
#
# Binaries: built elsewhere by `CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh`, which leaves
#   target/cuda/release/cjepa     the CLI
#   target/cuda/release/it-cuda   the integration-test binary
# (GPU machines here reach no network, so they cannot fetch crates or wheels). Without them, and
# with cargo + a CUDA toolkit on PATH, it builds them with cargo instead.
#
# Usage: scripts/gpu-check.sh [--quick]   (--quick: bench with 2 timed steps instead of 5)
# Environment: CJEPA_CUDA_TARGET (default target/cuda), GPU (default cuda:0),
#              BENCH_ARGS (extra args for bench train-step).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CJEPA_CUDA_TARGET:-$repo/target/cuda}"
gpu="${GPU:-cuda:0}"
steps=5
[[ "${1:-}" == --quick ]] && steps=2
say() { printf '\n[gpu-check] %s\n' "$*" >&2; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader ||
  { say "no nvidia-smi: this script needs a GPU machine"; exit 2; }

# 1. CUDA 13 runtime libraries
libs=()
if py=$(command -v python3); then
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for d in "$site/nvidia/cu13/lib" "$site/nvidia/nccl/lib"; do [[ -d "$d" ]] && libs+=("$d"); done
fi
[[ -n "${CUDA_HOME:-}" && -d "$CUDA_HOME/lib" ]] && libs+=("$CUDA_HOME/lib")
[[ ${#libs[@]} -gt 0 ]] || say "warning: no CUDA 13 library folder found; relying on the system's"
# libcublas etc. are found through their versioned sonames (libcublas.so.13, ...).
export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]:-}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cjepa="$target/release/cjepa"
tests="$target/release/it-cuda"
if [[ ! -x "$cjepa" || ! -x "$tests" ]]; then
  command -v cargo >/dev/null && command -v nvcc >/dev/null ||
    { say "missing $cjepa or $tests, and no cargo + nvcc to build them: run CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh on a build machine and copy target/cuda/release/{cjepa,it-cuda}"; exit 2; }
  say "building with cargo (--features cuda, target $target)"
  (cd "$repo" && CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo build --release --features cuda --target-dir "$target")
  t=$(cd "$repo" && CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo test --release --features cuda --target-dir "$target" --test it --no-run --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  cp "$t" "$tests"
fi

status=0
# 2. golden model tests on the GPU. The test binary looks for tests/golden under the path it was
# built in; CJEPA_GOLDEN_DIR adds this checkout's copy wherever the repo lives now.
say "golden model tests on $gpu"
if (cd "$repo" && CJEPA_TEST_DEVICE="$gpu" CJEPA_GOLDEN_DIR="$repo/tests/golden" \
    "$tests" golden_model --test-threads 1); then
  say "golden model tests on $gpu: PASSED"
else
  say "golden model tests on $gpu: FAILED"; status=1
fi

# 3. training-step throughput and model FLOP utilisation
say "bench train-step vit_base 224 px batch 64 on $gpu"
# shellcheck disable=SC2086
if out=$("$cjepa" bench train-step --model vit_base --img 224 --batch 64 --device "$gpu" \
    --steps "$steps" --warmup 2 ${BENCH_ARGS:-} | tee /dev/stderr); then
  line=$(grep '^RESULT ' <<<"$out" | tail -n1)
  ips=$(sed -n 's/.*images_per_s=\([^ ]*\).*/\1/p' <<<"$line")
  tf=$(sed -n 's/.*tflops=\([^ ]*\).*/\1/p' <<<"$line")
  mfu=$(sed -n 's/.*mfu=\([^ ]*\).*/\1/p' <<<"$line")
  say "vit_base/16 224 px batch 64 on $gpu: $ips images/s, $tf TFLOP/s, MFU $(awk -v m="$mfu" 'BEGIN{printf "%.2f%%", 100*m}') of 989.4 TFLOP/s"
else
  say "bench train-step failed"; status=1
fi
exit $status
