#!/usr/bin/env bash
# COCOeval speed: `cjepa bench cocoeval` (exact Rust port) vs pycocotools on the same
# val2017-sized synthetic files, bbox and segm, each from scratch (load + evaluate + accumulate +
# summarize). Ours is timed with 1 thread (the fair single-core ratio) and with all cores;
# pycocotools is single-threaded. Wall and CPU seconds (user + system of the process) are both
# printed: on a shared machine the 1-thread CPU ratio is the steadiest figure. Also checks that
# the 12 stats are identical.
#
# usage: bench/cocoeval_compare.sh [DIR] [extra args for `cjepa bench cocoeval`]
#   needs: cargo, python3 with pycocotools (`pip install pycocotools`)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/cjepa_cocoeval}
shift || true
mkdir -p "$DIR"

cargo build --release --quiet
NPROC=$(nproc)
echo "machine: $NPROC cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/cjepa bench cocoeval --write "$DIR" --threads 1 --threads "$NPROC" --json "$@" \
  > "$DIR/ours.json"
python3 bench/cocoeval_pycocotools.py --gt "$DIR/instances.json" --dt "$DIR/results.json" --json \
  > "$DIR/pycocotools.json"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$DIR" <<'EOF'
import json, sys
d = sys.argv[1]
ours = json.load(open(f"{d}/ours.json"))
py = json.load(open(f"{d}/pycocotools.json"))
p = ours["problem"]
print(f"problem: {p['images']} images, {p['annotations']} ground truths ({p['crowd']} crowd), "
      f"{p['detections']} detections; gt {p['gt_mb']:.1f} MB, results {p['dt_mb']:.1f} MB")
print(f"pycocotools {py['pycocotools']}")
print(f"{'type':<5}{'threads':>8}{'ours load':>11}{'ours eval':>11}{'ours total':>12}"
      f"{'py load':>10}{'py eval':>10}{'py total':>10}{'ratio total':>13}{'ratio eval':>12}"
      f"{'ours cpu':>10}{'py cpu':>9}{'ratio cpu':>11}")
ok = True
for run in ours["runs"]:
    n = run["threads"]
    for t, o in run["results"].items():
        q = py["results"][t]
        print(f"{t:<5}{n:>8}{o['load_s']:>10.2f}s{o['eval_s']:>10.2f}s{o['total_s']:>11.2f}s"
              f"{q['load_s']:>9.2f}s{q['eval_s']:>9.2f}s{q['total_s']:>9.2f}s"
              f"{q['total_s'] / o['total_s']:>12.1f}x{q['eval_s'] / o['eval_s']:>11.1f}x"
              f"{o['total_cpu_s']:>9.2f}s{q['total_cpu_s']:>8.2f}s"
              f"{q['total_cpu_s'] / o['total_cpu_s']:>10.1f}x")
        if o["stats"] != q["stats"]:
            ok = False
            diff = max(abs(a - b) for a, b in zip(o["stats"], q["stats"]))
            print(f"  STATS DIFFER for {t} ({n} threads): max |diff| {diff:.3g}")
print("stats identical to pycocotools: " + ("yes" if ok else "NO"))
sys.exit(0 if ok else 1)
EOF
