#!/usr/bin/env bash
# Fashion-MNIST (Zalando article photographs, 28 px grayscale, 10 classes) as a small imagefolder
# dataset for pipelines/examples/real_small.yaml: the first 300 training and 100 test images of
# each class (3,000 / 1,000), upscaled to 32 px, written as RGB PNGs.
#
# The IDX files come from the Debian / Ubuntu package `dataset-fashion-mnist`
# (/usr/share/datasets/fashion-mnist); the script installs it with apt-get when it is missing
# (as root) or reads the files from FMNIST_IDX if set.
#
# Usage: scripts/fashion-mnist.sh [OUT]
#   OUT defaults to ${CJEPA_DATA:-/data}/fashion-mnist-small (the path real_small.yaml reads).
# Environment: FMNIST_IDX (folder of the four *-ubyte.gz files), CJEPA (the cjepa binary, default
#   target/release/cjepa), TRAIN_PER_CLASS (300), VAL_PER_CLASS (100), SIZE (32).
# Exit codes: 0 written, 2 bad input (the message names the file and the fix).
set -euo pipefail

out="${1:-${CJEPA_DATA:-/data}/fashion-mnist-small}"
idx="${FMNIST_IDX:-/usr/share/datasets/fashion-mnist}"
cjepa="${CJEPA:-target/release/cjepa}"

if [ ! -f "$idx/train-images-idx3-ubyte.gz" ] && [ -z "${FMNIST_IDX:-}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing the dataset-fashion-mnist package" >&2
        apt-get install -y dataset-fashion-mnist >&2 || {
            apt-get update >&2 && apt-get install -y dataset-fashion-mnist >&2
        }
    else
        echo "error: $idx/train-images-idx3-ubyte.gz not found; install the package" \
            "(sudo apt-get install dataset-fashion-mnist) or set FMNIST_IDX to a folder" \
            "with the four *-ubyte.gz files" >&2
        exit 2
    fi
fi
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ ! -f "$idx/$f.gz" ] && [ ! -f "$idx/$f" ]; then
        echo "error: $idx/$f.gz not found; set FMNIST_IDX to the folder holding the Fashion-MNIST" \
            "IDX files (plain or .gz)" >&2
        exit 2
    fi
done
pick() { if [ -f "$idx/$1.gz" ]; then echo "$idx/$1.gz"; else echo "$idx/$1"; fi; }
if [ ! -x "$cjepa" ]; then
    echo "error: $cjepa not found; build it (cargo build --release) or set CJEPA to the binary" >&2
    exit 2
fi

exec "$cjepa" data import idx "$out" \
    --train-images "$(pick train-images-idx3-ubyte)" \
    --train-labels "$(pick train-labels-idx1-ubyte)" \
    --val-images "$(pick t10k-images-idx3-ubyte)" \
    --val-labels "$(pick t10k-labels-idx1-ubyte)" \
    --train-per-class "${TRAIN_PER_CLASS:-300}" \
    --val-per-class "${VAL_PER_CLASS:-100}" \
    --size "${SIZE:-32}" \
    --class-names tshirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot
