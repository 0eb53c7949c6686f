"""Images/s of imnet's loaders, as ratios measured in one run.

    python bench/data_throughput.py [--jpegs 512] [--workers 2] [--repeats 3] [--write]

1. A JPEG folder at 224 px (ImageNet-like files, 500x375 px, written once into a temp dir): the
   torch DataLoader with PIL (RandomResizedCrop + flip, `--workers` worker processes) against DALI's
   CPU pipeline (decoders.image_random_crop + resize + flip, `--workers` threads), train transforms.
   Same number of CPU workers for both, so the ratio is per core.
2. CIFAR-sized data (32x32x3 uint8, 50,000 images in memory, the CIFAR-10 recipe: crop with 4 px
   padding + flip + normalize): the torch DataLoader over the same dataset object (`--workers`
   workers) against the device-resident loader (data.loader=gpu; here on the CPU, one process).

Each measurement is the median over `--repeats` alternating runs, after one warm-up pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from benchmarks_md import append_rows, cpu_head


def write_jpegs(root: str, n: int, classes: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n if split == "train" else classes):
            folder = os.path.join(root, split, f"n{i % classes:08d}")
            os.makedirs(folder, exist_ok=True)
            # smooth noise compresses like a photo, not like white noise
            small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
            img.save(os.path.join(folder, f"img_{i:06d}.JPEG"), quality=90)


def rate(batches, batch: int, limit: int) -> float:
    """Images/s over `limit` batches of an iterable, the first batch (start-up) not counted."""
    it = iter(batches)
    next(it)
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        n += x.shape[0]
        if n >= limit * batch:
            break
    return n / (time.perf_counter() - t0)


def jpeg_torch(root: str, workers: int, batch: int) -> float:
    from imnet.data import TrainSampler
    from imnet.data.datasets import build_dataset

    ds, _ = build_dataset("imagenet", root, "train", augment=True)
    sampler = TrainSampler(len(ds), 0, 1, batch, 0)
    # forkserver: forking a process that already runs DALI's threads can deadlock the workers
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                                         multiprocessing_context="forkserver" if workers else None)
    return rate(loader, batch, len(loader) - 1)


def jpeg_dali(root: str, workers: int, batch: int) -> float:
    from imnet import config, dist
    from imnet.data import dali

    cfg = config.load(None, ["data.name=imagenet", f"data.root={root}", "data.loader=dali",
                             f"data.batch_size={batch}", f"data.workers={workers}"])
    d = dist.Dist(0, 1, 0, torch.device("cpu"), None, "single")
    loader = dali.build(cfg.data, d, "train", seed=cfg.run.seed, channels_last=cfg.model.channels_last)
    loader.sampler.set_epoch(0)
    return rate(loader, batch, len(loader) - 1)


def cifar_set(n: int = 50_000):
    from imnet.data.datasets import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26),
                              augment=True, flip=True)


def cifar_torch(ds, workers: int, batch: int) -> float:
    from imnet.data import TrainSampler

    sampler = TrainSampler(len(ds), 0, 1, batch, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
    return rate(loader, batch, len(loader) - 1)


def cifar_resident(ds, batch: int) -> float:
    from imnet.data import TrainSampler
    from imnet.data.resident import ResidentLoader

    sampler = TrainSampler(len(ds), 0, 1, batch, 0)
    loader = ResidentLoader(ds, sampler, batch, torch.device("cpu"), channels_last=False, train=True)
    return rate(loader, batch, len(loader) - 1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jpegs", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    rows = []
    try:
        import nvidia.dali  # noqa: F401
        has_dali = True
    except ImportError:
        has_dali = False
        print("DALI is not installed (pip install -e '.[dali]'): the JPEG comparison is not measured")
    ds = cifar_set()
    cifar_torch(ds, a.workers, a.batch), cifar_resident(ds, a.batch)  # warm-up
    t, r = [], []
    for i in range(a.repeats):
        t.append(cifar_torch(ds, a.workers, a.batch))
        r.append(cifar_resident(ds, a.batch))
        print(f"cifar 32 px, repeat {i}: torch {t[-1]:.0f} img/s, resident {r[-1]:.0f} img/s", flush=True)
    rows.append(("CIFAR-sized 32x32x3 in memory, crop+flip+normalize", f"torch DataLoader, {a.workers} workers",
                 statistics.median(t), "device-resident (data.loader=gpu) on the CPU", statistics.median(r)))
    with tempfile.TemporaryDirectory() as tmp:
        if has_dali:
            write_jpegs(tmp, a.jpegs)
            jpeg_torch(tmp, a.workers, a.batch), jpeg_dali(tmp, a.workers, a.batch)  # warm-up
            t, dl = [], []
            for i in range(a.repeats):
                t.append(jpeg_torch(tmp, a.workers, a.batch))
                dl.append(jpeg_dali(tmp, a.workers, a.batch))
                print(f"jpeg 224 px, repeat {i}: torch+PIL {t[-1]:.0f} img/s, DALI CPU {dl[-1]:.0f} img/s", flush=True)
            rows.append(("JPEG folder, 224 px train transform", f"torch DataLoader + PIL, {a.workers} workers",
                         statistics.median(t), f"DALI CPU, {a.workers} threads", statistics.median(dl)))
    head = (cpu_head()
            + (f", DALI {__import__('nvidia.dali').dali.__version__}" if has_dali else "")
            + f", batch {a.batch}, median of {a.repeats}")
    lines = [f"| {head} | {w} | {b} | {rb:.0f} | {c} | {rc:.0f} | {rc / rb:.2f}x |" for w, b, rb, c, rc in rows]
    print("\n".join(lines))
    if a.write:
        append_rows("<!-- data_throughput rows -->", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
