#!/usr/bin/env bash
# Build cjepa with `--features cuda` on a machine WITHOUT a GPU or a system CUDA toolkit.
#
# Automates the recipe in spec/CANDLE.md ("Building with --features cuda on a machine without a
# GPU"):
#   1. pip-download the exact CUDA 13.0 wheels (nvcc 13.0.x: the lent GPU machines run driver 580,
#      and PTX from a newer nvcc fails there with CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
#   2. unpack them into a CUDA_HOME-like tree (nvidia/cu13/{bin,include,lib,nvvm});
#   3. restore exec bits on bin/* and nvvm/bin/*;
#   4. add unversioned .so links in lib/;
#   5. generate a stub lib/stubs/libcuda.so (soname libcuda.so.1) from cudarc's driver bindings
#      (the real driver replaces it at run time);
#   6. export CUDA_HOME / PATH / CUDA_COMPUTE_CAP=90 and `cargo build --release --features
#      cuda,nccl` into a separate target dir (default target/cuda) so the CPU build stays valid.
# GPU builds include NCCL (data-parallel stages over several GPUs) unless CJEPA_CUDA_NCCL=0.
#
# Usage: scripts/build-cuda.sh [extra cargo args; `--features cuda` alone builds without NCCL]
# Environment:
#   CJEPA_CUDA_CACHE   wheel cache + unpacked toolkit (default: $HOME/.cache/cjepa-cuda)
#   CJEPA_CUDA_TARGET  cargo target dir (default: <repo>/target/cuda)
#   CUDA_COMPUTE_CAP   default 90 (H100/H200, sm_90a)
#   CJEPA_CUDA_NCCL=0  build without NCCL (`--features cuda`; default 1: `--features cuda,nccl`)
#   CJEPA_CUDA_NCCL_VERSION  nvidia-nccl-cu13 version to fetch (default 2.32.3: 2.30.7, the version
#                      CANDLE.md names, is no longer on the index; any 2.x links, and at run time
#                      the GPU machine's own libnccl is used)
#   CJEPA_CUDA_PREPARE_ONLY=1  prepare the toolkit, print the exports, do not build
#   CJEPA_CUDA_TESTS=1 also build the integration-test binary and copy it to
#                      $CJEPA_CUDA_TARGET/release/it-cuda (for scripts/gpu-check.sh on a GPU machine)
# Result: $CJEPA_CUDA_TARGET/release/cjepa. On the GPU machine run it with LD_LIBRARY_PATH pointing
# at the CUDA 13 libraries of the preinstalled PyTorch (site-packages/nvidia/cu13/lib, nvidia/nccl/lib).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CJEPA_CUDA_CACHE:-$HOME/.cache/cjepa-cuda}"
target="${CJEPA_CUDA_TARGET:-$repo/target/cuda}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
python="${PYTHON:-python3}"

wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.1.1.3
)
nccl="${CJEPA_CUDA_NCCL:-1}"
[[ " $* " == *" --features"* && " $* " != *nccl* ]] && nccl=0
if [[ "$nccl" == 1 ]]; then wheels+=("nvidia-nccl-cu13==${CJEPA_CUDA_NCCL_VERSION:-2.32.3}"); fi

say() { printf '[build-cuda] %s\n' "$*" >&2; }

# 1. download (pip skips files already in the cache folder)
mkdir -p "$cache/wheels" "$cache/root"
say "downloading ${#wheels[@]} wheels into $cache/wheels"
"$python" -m pip download --no-deps --only-binary=:all: \
  --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --python-version 3.11 -d "$cache/wheels" "${wheels[@]}" >&2

# 2. unpack every wheel once (a marker per wheel)
for whl in "$cache/wheels"/*.whl; do
  mark="$cache/root/.unpacked-$(basename "$whl")"
  [[ -e "$mark" ]] && continue
  say "unpacking $(basename "$whl")"
  "$python" -m zipfile -e "$whl" "$cache/root"
  touch "$mark"
done
cuda="$cache/root/nvidia/cu13"
[[ -x "$cuda/bin/nvcc" || -f "$cuda/bin/nvcc" ]] || { say "no nvcc under $cuda/bin after unpacking"; exit 1; }

# 3. exec bits
chmod +x "$cuda"/bin/* 2>/dev/null || true
[[ -d "$cuda/nvvm/bin" ]] && chmod +x "$cuda"/nvvm/bin/*

# 4. unversioned links
libs=(cublas cublasLt cudart curand nvrtc)
[[ "$nccl" == 1 ]] && libs+=(nccl)
for name in "${libs[@]}"; do
  dir="$cuda/lib"
  versioned="$(ls "$dir"/lib"$name".so.* 2>/dev/null | sort | head -n1 || true)"
  if [[ -z "$versioned" && "$name" == nccl ]]; then
    dir="$cache/root/nvidia/nccl/lib"
    versioned="$(ls "$dir"/libnccl.so.* 2>/dev/null | head -n1 || true)"
    [[ -n "$versioned" ]] && ln -sf "$versioned" "$cuda/lib/libnccl.so"
    continue
  fi
  [[ -n "$versioned" ]] || { say "missing lib$name.so.* in $dir"; exit 1; }
  ln -sf "$(basename "$versioned")" "$dir/lib$name.so"
done

# 5. libcuda stub from cudarc's driver bindings
stub="$cuda/lib/stubs/libcuda.so"
if [[ ! -e "$stub" ]]; then
  bindings="$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -n1 || true)"
  [[ -n "$bindings" ]] || { say "cudarc sources not in the cargo registry: run 'cargo fetch' first"; exit 1; }
  say "generating libcuda stub from $bindings"
  mkdir -p "$cuda/lib/stubs"
  src="$cuda/lib/stubs/libcuda_stub.c"
  grep -o -E '\bfn cu[A-Za-z0-9_]*' "$bindings" | sed 's/^fn //' | sort -u |
    awk '{ printf "int %s(void) { return 999; }\n", $1 }' >"$src"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$src"
  ln -sf libcuda.so "$cuda/lib/stubs/libcuda.so.1"
fi

# 6. build
export CUDA_HOME="$cuda" CUDA_PATH="$cuda" CUDA_ROOT="$cuda"
export PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "nvcc: $(nvcc --version | tail -n1)"
if [[ "${CJEPA_CUDA_PREPARE_ONLY:-0}" == 1 ]]; then
  printf 'export CUDA_HOME=%q PATH=%q LIBRARY_PATH=%q LD_LIBRARY_PATH=%q CUDA_COMPUTE_CAP=%q\n' \
    "$CUDA_HOME" "$PATH" "$LIBRARY_PATH" "$LD_LIBRARY_PATH" "$CUDA_COMPUTE_CAP"
  exit 0
fi
features=(--features cuda,nccl)
[[ "$nccl" == 1 ]] || features=(--features cuda)
for a in "$@"; do [[ "$a" == --features* ]] && features=(); done
cd "$repo"
start=$(date +%s)
say "cargo build --release ${features[*]} $* (target dir $target)"
cargo build --release "${features[@]}" --target-dir "$target" "$@"
bin="$target/release/cjepa"
say "built $bin ($(du -h "$bin" | cut -f1)) in $(( $(date +%s) - start )) s"
if [[ "${CJEPA_CUDA_TESTS:-0}" == 1 ]]; then
  t=$(cargo test --release "${features[@]}" --target-dir "$target" "$@" --test it --no-run --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
  [[ -n "$t" ]] || { say "no test executable reported by cargo"; exit 1; }
  cp "$t" "$target/release/it-cuda"
  say "built $target/release/it-cuda ($(du -h "$target/release/it-cuda" | cut -f1)) in $(( $(date +%s) - start )) s"
fi
