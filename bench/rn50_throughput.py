"""ResNet-50 training throughput with BN, native GN and imnet's GN, same run, same card.

    python bench/rn50_throughput.py [--batches 256 32] [--steps 30] [--warmup 10] [--rounds 3]
                                    [--variants bn gn_native gn_imnet gn_imnet_unfused_add]
                                    [--cuda-graph] [--write]

Synthetic data already on the GPU (a fixed random batch of 224x224 images and labels): this times
the model, not a loader. Each training step is what imnet's engine does on one GPU: bf16 autocast
forward, cross-entropy, backward, SGD (momentum 0.9, weight decay 1e-4, lr 0.1), channels-last model
and input, cuDNN autotune on. Variants (imnet.models.build("resnet50", ...), 32 groups for GN):

  bn                    BatchNorm2d (cuDNN)
  gn_native             model.gn_impl=native: torch's nn.GroupNorm
  gn_imnet              model.gn_impl=triton: imnet's channels-last kernels, norm + ReLU fused, and
                        the end of each block relu(norm(x) + identity) fused
  gn_imnet_unfused_add  the same, but the residual add + ReLU left to PyTorch (does that fusion pay?)

--cuda-graph captures each variant's whole step (forward, backward, SGD) once and replays it: the
host's Python and launch overhead drop out, so comparing with and without says whether a variant is
limited by the host (many small launches at 32 images) or by the GPU. Each variant then runs in a
process of its own (its rounds back to back, not alternating with the other variants).

Throughput = images / second over `--steps` steps after `--warmup` (CUDA-synchronized wall clock).
The variants alternate for `--rounds` rounds at each batch size; the median per variant is reported,
with each GN variant's ratio to BN. Prints markdown rows; --write appends them to BENCHMARKS.md below
the line `<!-- rn50_throughput rows -->` (the section must exist).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from benchmarks_md import append_rows, gpu_head

MARKER = "<!-- rn50_throughput rows -->"
VARIANTS = ("bn", "gn_native", "gn_imnet", "gn_imnet_unfused_add")


def build(variant: str) -> torch.nn.Module:
    from imnet import models
    from imnet.models.resnet import fuse_norm_act

    if variant == "bn":
        model = models.build("resnet50", num_classes=1000, norm="bn")
    else:
        impl = "native" if variant == "gn_native" else "triton"
        model = models.build("resnet50", num_classes=1000, norm="gn", norm_kwargs={"groups": 32, "impl": impl})
        if variant == "gn_imnet_unfused_add":
            fuse_norm_act(model, residual=False)
    return model.cuda().to(memory_format=torch.channels_last)


def make_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, cuda_graph: bool = False):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step():
        # autocast's weight-cast cache is off under graph capture (PyTorch's CUDA graphs notes)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graph):
            loss = F.cross_entropy(model(x), labels)
        if not cuda_graph:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if not cuda_graph:
        return step
    # Whole-step capture: warm up on a side stream (cuDNN autotuning, Triton compiles), then capture
    # one step with the gradients unset, so that backward writes them from the graph's own pool.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def images_per_second(step, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def measure(args) -> dict:
    """{variant: {batch: median img/s}} for args.variants in this process, variants alternating."""
    models = {v: build(v) for v in args.variants}
    med: dict = {v: {} for v in args.variants}
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device="cuda")
        steps = {v: make_step(m, x, labels, args.cuda_graph) for v, m in models.items()}
        results = {v: [] for v in steps}
        for _ in range(args.rounds):
            for v, step in steps.items():
                results[v].append(images_per_second(step, batch, args.steps, args.warmup))
        for v, r in results.items():
            med[v][batch] = statistics.median(r)
        del x, labels, steps
        torch.cuda.empty_cache()
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 32], help="images per GPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each variant's whole training step as one CUDA graph: no host overhead, so "
                        "the GPU time alone (does a variant lose to BN on the host or on the GPU?)")
    p.add_argument("--write", action="store_true", help=f"append the rows to BENCHMARKS.md below {MARKER}")
    p.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)  # one variant's figures, for the parent
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("rn50_throughput: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    head = gpu_head()
    if args.cuda_graph and len(args.variants) > 1:
        # One process per variant: with several whole-step graphs captured in one process the first
        # replay failed on an H100 (illegal memory access), while each variant alone ran.
        med = {}
        for v in args.variants:
            cmd = [sys.executable, __file__, "--variants", v, "--cuda-graph", "--emit-json", "--batches",
                   *map(str, args.batches), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rounds", str(args.rounds)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"rn50_throughput: {v} failed:\n{out.stdout}{out.stderr}", file=sys.stderr)
                return 1
            med[v] = {int(b): r for b, r in json.loads(out.stdout.splitlines()[-1]).items()}
    else:
        med = measure(args)
    if args.emit_json:
        print(json.dumps({b: med[args.variants[0]][b] for b in args.batches}))
        return 0
    print("| date | GPU | versions | images/GPU | variant | img/s (median of rounds) | / bn |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for batch in args.batches:
        for v in args.variants:
            name = f"{v} (CUDA graph)" if args.cuda_graph else v
            ratio = f"{med[v][batch] / med['bn'][batch]:.3f}" if "bn" in med else "-"  # without bn: no ratio
            row = f"| {head} | {batch} | {name} | {med[v][batch]:.0f} | {ratio} |"
            print(row, flush=True)
            rows.append(row)
    if args.write:
        append_rows(MARKER, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
