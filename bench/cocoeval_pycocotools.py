#!/usr/bin/env python3
"""Time pycocotools' COCOeval on the files written by `cjepa bench cocoeval --write DIR`.

Same phases as the Rust bench, each IoU type from scratch:
  load      = COCO(instances.json) + coco.loadRes(results.json)
  evaluate  = COCOeval(gt, dt, iouType).evaluate()   (includes _prepare: annToRLE of every mask)
  accumulate, summarize
Usage: cocoeval_pycocotools.py --gt DIR/instances.json --dt DIR/results.json
       [--iou-type bbox|segm|both] [--reps N] [--json]
"""
import argparse
import contextlib
import importlib.metadata
import io
import json
import time

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def time_once(gt_path, dt_path, iou_type):
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        t0, c0 = time.perf_counter(), time.process_time()
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        t1, c1 = time.perf_counter(), time.process_time()
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        t2 = time.perf_counter()
        ev.accumulate()
        t3 = time.perf_counter()
        ev.summarize()
        t4, c4 = time.perf_counter(), time.process_time()
    return {
        "load_cpu_s": c1 - c0,
        "eval_cpu_s": c4 - c1,
        "total_cpu_s": c4 - c0,
        "load_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "accumulate_s": t3 - t2,
        "summarize_s": t4 - t3,
        "eval_s": t4 - t1,
        "total_s": t4 - t0,
        "stats": [float(x) for x in ev.stats],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", required=True)
    ap.add_argument("--dt", required=True)
    ap.add_argument("--iou-type", default="both", choices=["bbox", "segm", "both"])
    ap.add_argument("--reps", type=int, default=1, help="repetitions (the fastest is reported)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    types = ["bbox", "segm"] if a.iou_type == "both" else [a.iou_type]
    out = {"pycocotools": importlib.metadata.version("pycocotools"), "results": {}}
    for t in types:
        best = min((time_once(a.gt, a.dt, t) for _ in range(max(1, a.reps))),
                   key=lambda r: r["total_s"])
        out["results"][t] = best
        if not a.json:
            print(f"pycocotools {t:<4}: load {best['load_s']:7.3f} s + evaluate "
                  f"{best['evaluate_s']:7.3f} s + accumulate {best['accumulate_s']:6.3f} s + "
                  f"summarize {best['summarize_s']:5.3f} s = {best['total_s']:7.3f} s  "
                  f"(cpu {best['total_cpu_s']:7.3f} s; AP {best['stats'][0]:.4f}, AR100 {best['stats'][8]:.4f})")
    if a.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
