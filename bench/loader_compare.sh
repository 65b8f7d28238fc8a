#!/usr/bin/env bash
# Loader speed: cjepa's decode + RandomResizedCrop + flip + normalise (exact and scaled decode) vs
# Pillow + torchvision, one thread each, on the same generated ImageNet-sized JPEGs (500x375,
# quality 90), side by side in rounds; each side's best round counts, in images per wall-clock
# second of one thread and per CPU second (the steadier figure on a busy machine).
# Usage: bench/loader_compare.sh [IMAGES] [SIZES] [ROUNDS]   (defaults: 256 "224 64" 3)
# Python: $LOADER_PYTHON, else bench/.venv-loader (made on first use: pillow, numpy, torch and
# torchvision from PyPI, a few GB); without torchvision the Pillow + numpy twin is timed instead.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-256}
sizes=${2:-"224 64"}
rounds=${3:-3}
py=${LOADER_PYTHON:-}
if [[ -z "$py" ]]; then
  venv=bench/.venv-loader
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pillow numpy torch torchvision
  fi
  py=$venv/bin/python
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo build --release -q
"$py" bench/loader_pil.py make "$dir/data" "$n" 500 375 90
cj=./target/release/cjepa
best() { sort -g | tail -n 1; }
for size in $sizes; do
  for f in exact scaled py; do : >"$dir/$f" && : >"$dir/$f.cpu"; done
  for r in $(seq "$rounds"); do
    for mode in exact scaled; do
      "$cj" bench loader --dir "$dir/data" --threads 1 --size "$size" --decode "$mode" >"$dir/rs.log"
      sed -n 's/^RESULT rust_per_core=\([0-9.]*\).*/\1/p' "$dir/rs.log" >>"$dir/$mode"
      sed -n 's/^RESULT .*rust_per_cpu_s=\([0-9.]*\).*/\1/p' "$dir/rs.log" >>"$dir/$mode.cpu"
    done
    "$py" bench/loader_pil.py "$dir/data" "$size" >"$dir/py.log"
    sed -n 's/^RESULT py_per_core=\([0-9.]*\).*/\1/p' "$dir/py.log" >>"$dir/py"
    sed -n 's/^RESULT .*py_per_cpu_s=\([0-9.]*\).*/\1/p' "$dir/py.log" >>"$dir/py.cpu"
    echo "size $size round $r, images/s (per CPU s): exact $(tail -n1 "$dir/exact") ($(tail -n1 "$dir/exact.cpu")), scaled $(tail -n1 "$dir/scaled") ($(tail -n1 "$dir/scaled.cpu")), $(head -n1 "$dir/py.log" | cut -d: -f1) $(tail -n1 "$dir/py") ($(tail -n1 "$dir/py.cpu"))"
  done
  e=$(best <"$dir/exact") s=$(best <"$dir/scaled") p=$(best <"$dir/py")
  ec=$(best <"$dir/exact.cpu") sc=$(best <"$dir/scaled.cpu") pc=$(best <"$dir/py.cpu")
  python3 -c "print(f'RESULT size=$size wall: exact={$e / $p:.2f}x scaled={$s / $p:.2f}x  per CPU second: exact={$ec / $pc:.2f}x scaled={$sc / $pc:.2f}x')"
  "$cj" bench loader --dir "$dir/data" --threads 1 --size "$size" --decode scaled --diff |
    sed -n '/^scaled vs exact/,$p'
done
