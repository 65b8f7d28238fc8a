#!/usr/bin/env bash
# Packs the CUDA binaries built by `CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh` into .gpu/ (gzip,
# stripped), for a GPU machine without a Rust toolchain: copy the checkout there (with .gpu/) and
# run scripts/gpu-check.sh, which unpacks them. .gpu/ is ignored by git.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CJEPA_CUDA_TARGET:-$repo/target/cuda}"
mkdir -p "$repo/.gpu"
for b in cjepa it-cuda; do
  src="$target/release/$b"
  [[ -x "$src" ]] || { echo "[gpu-pack] missing $src: run CJEPA_CUDA_TESTS=1 scripts/build-cuda.sh" >&2; exit 1; }
  tmp="$(mktemp)"
  strip -o "$tmp" "$src"
  gzip -6 -c "$tmp" >"$repo/.gpu/$b.gz"
  rm -f "$tmp"
  echo "[gpu-pack] .gpu/$b.gz ($(du -h "$repo/.gpu/$b.gz" | cut -f1), from $(du -h "$src" | cut -f1))" >&2
done
