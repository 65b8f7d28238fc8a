#!/usr/bin/env python3
"""Reads cjepa's live curves with TensorBoard's own loader and prints them.

Usage: python3 scripts/tensorboard-check.py DIR [TAG ...]
DIR is a run folder (`<store>/work/<key>/tb/<stage>` while a stage trains, `<store>/artifacts/<key>/tb/<stage>`
after) or any folder above it. Needs the `tensorboard` package (`pip install tensorboard`); exits 2
without it. Prints `run tag step value` lines and exits 1 if no scalar was found.
"""
import os
import sys

try:
    from tensorboard.backend.event_processing import event_multiplexer
except ImportError:
    print("tensorboard is not installed: pip install tensorboard", file=sys.stderr)
    sys.exit(2)

root = sys.argv[1]
tags = set(sys.argv[2:])
mux = event_multiplexer.EventMultiplexer()
mux.AddRunsFromDirectory(root)
mux.Reload()
found = 0
for run, content in sorted(mux.Runs().items()):
    for tag in sorted(content.get("scalars", [])):
        if tags and tag not in tags:
            continue
        for ev in mux.Scalars(run, tag):
            print(f"{run} {tag} {ev.step} {ev.value:.6g}")
            found += 1
sys.exit(0 if found else 1)
