"""What imnet's training loop costs on top of a minimal hand-written loop, on the CPU.

    python bench/trainer_overhead.py [--steps 200] [--repeats 3] [--write]

Both loops train the same model (the default config's small net with GN, on digits) on the same
dataset object, one process, with the same batch size, optimizer and lr. imnet's loop runs as
configured in configs/digits_gn.yaml (tqdm bar, metrics.jsonl every 10 steps, the per-step
all-reduce of decisions and metrics, checkpoints every 100 steps and at each epoch end), except that
validation is off (run.eval_every=0, and the final validation is not timed) since a minimal loop
does not evaluate. Time per step is taken from step `--skip` to the last step, so start-up (imports,
dataset, model) is not counted for either. The two loops alternate, `--repeats` times; the ratio of
medians is reported. `--write` appends the result to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from benchmarks_md import append_rows, cpu_cells

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_gn.yaml")


def imnet_loop(steps: int, skip: int, out_dir: str) -> float:
    """Seconds per step of imnet's own fit(), from the metrics.jsonl timestamps."""
    from imnet import config, dist, train
    from imnet.log import read_metrics

    cfg = config.load(CONFIG, [f"run.out_dir={out_dir}", "run.name=imnet", f"run.max_steps={steps}",
                               "run.eval_every=0", "run.epochs=100", "ckpt.resume=never"])
    train.fit(cfg, dist.setup(cfg.dist))
    t = {r["step"]: r["time"] for r in read_metrics(os.path.join(out_dir, "imnet")) if r["split"] == "train"}
    first = min(s for s in t if s >= skip)
    return (t[steps] - t[first]) / (steps - first)


def minimal_loop(steps: int, skip: int) -> float:
    """The same work written by hand: DataLoader, forward, loss, backward, SGD step."""
    from imnet import config, models
    from imnet.data import TrainSampler
    from imnet.data.datasets import build_dataset

    cfg = config.load(CONFIG)
    torch.manual_seed(0)
    ds, info = build_dataset("digits", cfg.data.root, "train", augment=True)
    sampler = TrainSampler(len(ds), 0, 1, cfg.data.batch_size, 0)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True)
    model = models.from_config(cfg.model, info).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step, epoch, t0 = 0, 0, None
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # a real loop looks at its loss
            step += 1
            if step == skip:
                t0 = time.perf_counter()
            if step == steps:
                break
        epoch += 1
    return (time.perf_counter() - t0) / (steps - skip)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps not timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    mine, ref = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            ref.append(minimal_loop(a.steps, a.skip))
            mine.append(imnet_loop(a.steps, a.skip, os.path.join(tmp, str(i))))
            print(f"repeat {i}: minimal {1 / ref[-1]:.2f} steps/s, imnet {1 / mine[-1]:.2f} steps/s", flush=True)
    m, r = statistics.median(mine), statistics.median(ref)
    ratio = m / r
    line = (f"| {cpu_cells()} | {a.steps} steps x {a.repeats} | "
            f"{1 / r:.2f} | {1 / m:.2f} | {ratio:.3f} |")
    print(f"imnet / minimal time per step (median of {a.repeats}): {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%)")
    print(line)
    if a.write:
        append_rows("<!-- trainer_overhead rows -->", [line])


if __name__ == "__main__":
    sys.exit(main())
