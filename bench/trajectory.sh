#!/usr/bin/env bash
# The training trajectory of the quickstart's pretraining, ours vs a PyTorch trainer after the
# official ijepa `train.py` loop, from the same initial weights on the same batches and masks:
# `cjepa bench trajectory run --replay` trains ours and writes the replay files,
# `bench/torch_step.py --replay` trains the twin on them, `cjepa bench trajectory compare` prints
# the largest relative deviation per quantity over the first 1, 10, 100, 300 steps.
#
#   bench/trajectory.sh                      # both methods, 300 steps
#   METHODS=cjepa STEPS=10 bench/trajectory.sh
#   GOLDEN=1 bench/trajectory.sh             # also refresh tests/golden/trajectory/ (the twin's files)
#
# Environment: METHODS ("ijepa cjepa"), STEPS (300), SEED (0), THREADS (nproc),
# OUT (target/trajectory), VENV (target/trajectory-venv: made with CPU torch when PYTHON is unset),
# PYTHON (an interpreter with torch and numpy), CJEPA_BIN (target/release/cjepa, built when missing),
# KEEP (set: keep the replayed batches, OUT/quick_<method>/replay/images.f32, 470 MB for 300 steps).
set -euo pipefail
cd "$(dirname "$0")/.."

METHODS=${METHODS:-"ijepa cjepa"}
STEPS=${STEPS:-300}
SEED=${SEED:-0}
THREADS=${THREADS:-$(nproc)}
OUT=${OUT:-target/trajectory}
VENV=${VENV:-target/trajectory-venv}
BIN=${CJEPA_BIN:-target/release/cjepa}

if [ ! -x "$BIN" ]; then
    cargo build --release --bin cjepa
fi
if [ -z "${PYTHON:-}" ]; then
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet numpy
        "$VENV/bin/pip" install --quiet torch --index-url https://download.pytorch.org/whl/cpu ||
            "$VENV/bin/pip" install --quiet torch
    fi
    PYTHON=$VENV/bin/python
fi
"$PYTHON" -c "import torch, numpy" || {
    echo "trajectory.sh: $PYTHON lacks torch or numpy" >&2
    exit 2
}
export RAYON_NUM_THREADS=$THREADS

for m in $METHODS; do
    dir=$OUT/quick_$m
    echo "== $m: cjepa"
    "$BIN" bench trajectory run --method "$m" --steps "$STEPS" --seed "$SEED" --out "$dir" --replay
    echo "== $m: pytorch"
    "$PYTHON" bench/torch_step.py --replay "$dir/replay" --out "$dir/torch.json" --threads "$THREADS"
    echo "== $m: deviations"
    "$BIN" bench trajectory compare "$dir/trajectory.json" "$dir/torch.json"
    if [ -n "${GOLDEN:-}" ]; then
        mkdir -p "tests/golden/trajectory/quick_$m"
        cp "$dir/torch.json" "tests/golden/trajectory/quick_$m/trajectory.json"
    fi
    [ -n "${KEEP:-}" ] || rm -f "$dir/replay/images.f32"
done
