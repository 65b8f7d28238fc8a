"""Pillow twin of `cjepa bench loader`: decode + RandomResizedCrop(224, bicubic) + flip + normalise.

Uses torchvision's transforms when torchvision is installed, otherwise the same algorithm written
with Pillow + numpy (torchvision's RandomResizedCrop on a PIL image is: draw the box, crop, then
`img.resize(size, BICUBIC)`). Single process, one thread: images/s per core.

`loader_pil.py make DIR N [W H QUALITY]` writes N photo-like JPEGs (default 500x375, quality 90:
ImageNet-sized, about 100 KB each; smooth colour fields, mid-frequency texture and sensor-like
noise) as an ImageFolder `DIR/train/c<k>/`, for both sides of `bench/loader_compare.sh`.
"""
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def rrc_params(w, h, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        ar = math.exp(random.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return random.randint(0, w - cw), random.randint(0, h - ch), cw, ch
    return 0, 0, w, h


def pil_pipeline(path, size):
    img = Image.open(path).convert("RGB")
    x, y, cw, ch = rrc_params(*img.size)
    img = img.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - MEAN) / STD).transpose(2, 0, 1)


def make(root, n, w=500, h=375, quality=90):
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        small = rng.uniform(0, 255, size=(h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
        mid = rng.uniform(0, 255, size=(h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
        mid = np.asarray(Image.fromarray(mid).resize((w, h), Image.BILINEAR), dtype=np.float32)
        a = 0.6 * base + 0.4 * mid + rng.normal(0, 10, size=(h, w, 3))
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img_{i:05}.JPEG"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, "JPEG", quality=quality)
        total += p.stat().st_size
    print(f"wrote {n} {w}x{h} JPEGs (quality {quality}), {total / n / 1000:.0f} KB on average")


def main():
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:7]))
        return
    root = Path(sys.argv[1])
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    files = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    if len(sys.argv) > 3 and sys.argv[3] == "pillow":
        raise SystemExit(run(files, lambda p: pil_pipeline(p, size), "pillow+numpy"))
    try:
        import torch
        import torchvision.transforms as T

        torch.set_num_threads(1)
        tf = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN.tolist(), STD.tolist())])
        fn, name = (lambda p: tf(Image.open(p).convert("RGB"))), "torchvision"
    except ImportError:
        fn, name = (lambda p: pil_pipeline(p, size)), "pillow+numpy"
    run(files, fn, name)


def run(files, fn, name):
    for p in files[:16]:
        fn(p)  # warm up
    t0, c0 = time.perf_counter(), time.process_time()
    for p in files:
        fn(p)
    rate = len(files) / (time.perf_counter() - t0)
    cpu = len(files) / (time.process_time() - c0)
    print(f"{name}: {len(files)} images, {rate:.1f} images/s (1 thread), {cpu:.1f} per CPU second")
    print(f"RESULT py_per_core={rate:.2f} py_per_cpu_s={cpu:.2f}")


if __name__ == "__main__":
    main()
