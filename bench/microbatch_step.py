"""Training steps per second at 1, 2 and 4 images per process: the synchronous step imnet took before
(imnet.engine.sync.SyncDDPEngine, whose host reads every step's decisions and metrics) against the
default one (decisions on the device, imnet.engine.Meter read every --log-every steps), and on a GPU
the default one replayed as a CUDA graph (run.cuda_graph).

    python bench/microbatch_step.py [--device cpu|cuda] [--arch resnet20] [--batches 1 2 4]
                                    [--steps 100] [--rounds 5] [--log-every 50] [--write]

Every variant: the same model (GroupNorm, 8 groups; resnet20 is the CIFAR ResNet at 32 px, resnet50
runs at 224 px) from the same seed, the same random batches already on the device, SGD with momentum,
one process. fp32 on the CPU; bf16 autocast and channels-last on a GPU. Each step does what
imnet.train does per step: the engine's step, then (sync) read the step's figures, or (device,
graph) Meter.add and the one-step-late stop flag, with a Meter read every --log-every steps.
The variants alternate, round by round; the median steps/s of each over --rounds rounds of --steps
steps is reported with its ratio to the synchronous step. On the CPU the host is the device: nothing
can overlap, so the ratio says what the device-side bookkeeping costs the host (1.0: nothing). Then
it prints the host time of that bookkeeping alone (Meter.add, reduce_step: see parts()).
`--write` puts the rows in BENCHMARKS.md below `<!-- microbatch_step rows -->`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from benchmarks_md import alternating_rounds, append_rows, cpu_cells, gpu_head

MARKER = "<!-- microbatch_step rows -->"


def make(kind: str, args, device: str):
    """A step function for variant `kind` ("sync", "device", "graph") at its own engine."""
    from imnet import config, dist, engine, models
    from imnet.engine.sync import SyncDDPEngine

    cuda = device == "cuda"
    size = 224 if args.arch == "resnet50" else 32
    cfg = config.load(None, [f"dist.device={device}", f"precision.amp={'bf16' if cuda else 'off'}",
                             f"model.channels_last={str(cuda).lower()}", "model.gn_groups=8",
                             f"dist.max_nonfinite={10**9}"])
    torch.manual_seed(0)
    model = models.build(args.arch, num_classes=10, image_size=size, norm="gn", norm_kwargs={"groups": 8})
    d = dist.setup(cfg.dist)
    eng = (SyncDDPEngine if kind == "sync" else engine.DDPEngine)(cfg, model, d)
    train_step = engine.GraphStep(eng, log=lambda s: None) if kind == "graph" else eng.train_step
    meter = engine.Meter(d.device, cfg.dist.max_nonfinite)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    g = torch.Generator().manual_seed(1)
    state = {"i": 0}

    def batches(n: int):
        return [(torch.randn(n, 3, size, size, generator=g).to(d.device, memory_format=fmt),
                 torch.randint(0, 10, (n,), generator=g).to(d.device)) for _ in range(8)]

    def run(data: list, steps: int) -> None:
        for _ in range(steps):
            batch = data[state["i"] % len(data)]
            state["i"] += 1
            out = train_step([batch], 0.01)
            if kind == "sync":
                out.stats.tolist()  # the loop read loss, top1, images, skipped and stop every step
            else:
                meter.add(out)
                meter.stop_before()
                if state["i"] % args.log_every == 0:
                    meter.read()
    return batches, run


def measure(args) -> list[dict]:
    device = args.device
    kinds = ["sync", "device"] + (["graph"] if device == "cuda" else [])
    variants = {k: make(k, args, device) for k in kinds}
    rows = []
    for n in args.batches:
        data = {k: batches(n) for k, (batches, _) in variants.items()}
        rates = {k: [] for k in kinds}
        for k, (_, run) in variants.items():  # warm-up: autotuning, compiles, the graph's capture
            run(data[k], 5)
        for _ in range(args.rounds):
            for k, (_, run) in variants.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(data[k], args.steps)
                if device == "cuda":
                    torch.cuda.synchronize()
                rates[k].append(args.steps / (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"images": n, **med})
        print(f"{n} images: " + ", ".join(f"{k} {v:.1f} steps/s" for k, v in med.items())
              + f"; device/sync {med['device'] / med['sync']:.3f}x", flush=True)
    return rows


def parts(device: str, rounds: int) -> dict[str, float]:
    """Host microseconds per call of the default step's own bookkeeping, alone: Meter.add (with the stop
    flag's copy) and reduce_step (the decisions' all-reduce, as measure()'s engines set up), median over
    `rounds` rounds of 1000 calls. On a GPU this is the launch cost, not the device time."""
    from imnet import engine

    dev = torch.device(device)
    meter = engine.Meter(dev, 10**9)
    out = engine.StepOut(torch.tensor([0.0, 0.0, 1.5, 1.0, 2.0], device=dev))
    loss_sum, correct = torch.tensor(1.5, device=dev), torch.tensor(1.0, device=dev)
    times = alternating_rounds({"Meter.add": lambda: meter.add(out),
                                "reduce_step": lambda: engine.reduce_step(loss_sum, correct, 2, False)},
                               rounds=rounds, iters=1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", choices=["resnet20", "resnet50"], default="resnet20")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="images per process")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("microbatch_step.py --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = measure(args)
    print("host time alone: " + ", ".join(f"{k} {us:.0f} us" for k, us in parts(args.device, args.rounds).items()),
          flush=True)
    head = gpu_head(with_tuning=False) if args.device == "cuda" else cpu_cells()
    md = [f"| {head} | {args.arch} | {r['images']} | {r['sync']:.1f} | {r['device']:.1f} | "
          f"{r['device'] / r['sync']:.3f}x | " + (f"{r['graph']:.1f} | {r['graph'] / r['device']:.2f}x |"
                                                  if "graph" in r else "not on the CPU | |") for r in rows]
    print("\n".join(md))
    if args.write:
        append_rows(MARKER, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
