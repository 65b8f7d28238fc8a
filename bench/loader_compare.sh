#!/usr/bin/env bash
# Loader speed: cjepa's decode + RandomResizedCrop + normalise vs Pillow (torchvision if installed)
# on the same JPEGs, one thread each. Usage: bench/loader_compare.sh [IMAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-256}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo build --release -q
rust=$(./target/release/cjepa bench loader --images "$n" --keep "$dir/data" --threads 1 | tee /dev/stderr | sed -n 's/^RESULT rust_per_core=\([0-9.]*\).*/\1/p')
py=$(python3 bench/loader_pil.py "$dir/data" 224 | tee /dev/stderr | sed -n 's/^RESULT py_per_core=\([0-9.]*\)/\1/p')
python3 -c "print(f'ratio cjepa / python: {$rust / $py:.2f}x images/s per core')"
