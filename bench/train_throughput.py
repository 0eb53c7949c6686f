"""imnet.train itself on one GPU, against bench/rn50_throughput.py's loop on the same card in the same run.

    python bench/train_throughput.py [--batches 2 32 256] [--norms bn gn] [--graph eager graph]
                                     [--windows 6] [--write]
    python bench/train_throughput.py --smoke    # the same path on the CPU, small net (the tests run it)

Each trainer figure is one run of `torchrun --nproc_per_node 1 -m imnet.train` (the CLI: config,
loader, engine, logging at its defaults: tqdm bar, a train record every log.every_steps=10 steps) with
ResNet-50, bf16, channels-last, 1000 classes, data.loader=gpu over a synthetic uint8 set resident on
the GPU (its crops and flips run on the GPU), no validation until the end and no checkpoint until the
end; `graph` adds run.cuda_graph=true. Its img/s is the median of the train records' img_per_s,
leaving out the first two windows (cuDNN autotuning, Triton compiles, the graph's capture). The loop:
rn50_throughput.py --emit-json for bn and gn_imnet, eager and --cuda-graph (a fixed batch, no loader,
no bookkeeping). Targets (issue 18): the trainer >= 0.95x the loop at every batch; at 2 images the
graph >= 2x eager; GN >= 1.0x BN at 32 images in the trainer. Each row is printed (and with --write
put in BENCHMARKS.md below `<!-- train_throughput rows -->`) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- train_throughput rows -->"
LOOP_VARIANT = {"bn": "bn", "gn": "gn_imnet"}


def trainer_img_s(norm: str, graph: bool, batch: int, windows: int, out_dir: str, smoke: bool) -> float:
    every = 10
    model = (["model.arch=small", "data.image_size=16", "dist.device=cpu", "precision.amp=off",
              "model.channels_last=false", "model.gn_groups=8"] if smoke else
             ["model.arch=resnet50", "data.image_size=224", "data.synthetic_classes=1000", "precision.amp=bf16",
              "model.channels_last=true", "model.gn_groups=32"])
    name = f"{norm}_{'graph' if graph else 'eager'}_{batch}"
    overrides = [*model, "data.name=synthetic", f"data.synthetic_size={max(64, 16 * batch)}", "data.loader=gpu",
                 f"data.batch_size={batch}", f"model.norm={norm}", f"run.cuda_graph={str(graph).lower()}",
                 "run.epochs=100000", f"run.max_steps={every * (windows + 2)}", "run.eval_every=0",
                 "ckpt.epoch_end=false", "ckpt.every_steps=0", "ckpt.resume=never", f"run.out_dir={out_dir}",
                 f"run.name={name}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
           "--master_addr", "127.0.0.1", "--master_port", "29517", "-m", "imnet.train", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        print(f"train_throughput: {name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}",
              file=sys.stderr, flush=True)
        raise RuntimeError(f"exit {p.returncode}")
    for line in p.stdout.splitlines():
        if "run.cuda_graph" in line:
            print(f"  {name}: {line.strip()}", flush=True)
    with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    rates = [r["img_per_s"] for r in rows if r["split"] == "train"][2:]
    return statistics.median(rates)


def loop_img_s(norm: str, graph: bool, batches: list[int]) -> dict[int, float]:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "rn50_throughput.py"), "--variants", LOOP_VARIANT[norm],
           "--emit-json", "--batches", *map(str, batches)] + (["--cuda-graph"] if graph else [])
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:  # the trainer rows still come, without the loop's
        print(f"train_throughput: the loop ({norm}, graph={graph}) failed:\n{p.stdout}{p.stderr}", file=sys.stderr)
        return {}
    return {int(b): r for b, r in json.loads(p.stdout.splitlines()[-1]).items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 32, 256], help="images per GPU")
    p.add_argument("--norms", nargs="+", default=["bn", "gn"], choices=["bn", "gn"])
    p.add_argument("--graph", nargs="+", default=["eager", "graph"], choices=["eager", "graph"])
    p.add_argument("--windows", type=int, default=6, help="train records timed per run (after 2 left out)")
    p.add_argument("--smoke", action="store_true", help="on the CPU, a small net, no loop: checks this script")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("train_throughput.py needs a CUDA GPU (--smoke runs its path on the CPU)", file=sys.stderr)
            return 2
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from benchmarks_md import append_rows, gpu_head

        head = gpu_head(with_tuning=False)
    else:
        head = "smoke (CPU)"
    print("| date | GPU | versions | images/GPU | norm | step | imnet.train img/s | loop img/s | train/loop |")
    measured, failed = {}, 0  # (norm, batch) -> {graph: img/s}
    with tempfile.TemporaryDirectory() as out_dir:
        for graph in (g == "graph" for g in args.graph):
            for norm in args.norms:
                loop = {} if args.smoke else loop_img_s(norm, graph, args.batches)
                for b in args.batches:
                    try:
                        t = trainer_img_s(norm, graph, b, args.windows, out_dir, args.smoke)
                    except RuntimeError as e:  # said on stderr; the other runs go on
                        failed += 1
                        print(f"| {head} | {b} | {norm} | {'graph' if graph else 'eager'} | failed ({e}) | | |")
                        continue
                    measured.setdefault((norm, b), {})[graph] = t
                    ref = loop.get(b)
                    vs = f"{ref:.0f} | {t / ref:.3f}x" if ref else "- | -"
                    extra = ""
                    if graph and False in measured[(norm, b)]:
                        extra = f" (graph/eager {t / measured[(norm, b)][False]:.2f}x)"
                    row = (f"| {head} | {b} | {norm} | {'graph' if graph else 'eager'} | {t:.0f}{extra} | {vs} |")
                    print(row, flush=True)
                    if args.write:
                        append_rows(MARKER, [row])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
