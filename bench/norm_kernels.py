"""Forward + backward time of one norm layer: BN, native GN, torch.compile'd GN and imnet's GN.

    python bench/norm_kernels.py [--batches 32 2] [--epilogue none|relu|residual] [--iters 50]
                                 [--repeats 5] [--methods bn gn gn_compile imnet] [--cuda-graph]
                                 [--tune local=16 ...] [--write]

Every distinct ResNet-50 norm input shape (C, H, W at 224x224), channels-last bf16 activations with
float32 parameters under bf16 autocast (as in training: native GN then runs in float32, which is
part of its cost), at each batch size. One timed step is y = norm(x) then the gradients of x, gamma
and beta for a random dy (torch.autograd.grad, so nothing accumulates). Timing: CUDA events around
`--iters` steps after warm-up, `--repeats` times, the median per step; the methods alternate within
each repeat so drift hits them alike. Eager steps of the small layers at 32 or 2 images time the
host (Python, autograd, launches), not the GPU: --cuda-graph captures the `--iters` steps as one
CUDA graph per method and times its replays, the GPU's time alone.

  bn         nn.BatchNorm2d (cuDNN), training mode
  gn         nn.GroupNorm(32, C) (torch's kernel)
  gn_compile torch.compile(nn.GroupNorm(32, C)) (Inductor's generated kernels)
  imnet      imnet.kernels.ChannelsLastGroupNorm(32, C) (the Triton kernels)

--tune (with --cuda-graph) adds imnet under other launch plans (IMNET_GN_TUNE strings) to the same
repeats: each one's steps are captured under its plan, and it gets a row of its own (its plan in
the versions column; bn, gn as measured alongside).

--epilogue relu times norm + ReLU (in place after bn/gn/gn_compile, fused in imnet); residual times
relu(norm(x) + r) (gradient for r too), the end of a bottleneck block: whether fusing pays.

Bandwidth: the bytes a fused norm must move at least, fwd read x + write y, bwd read x and dy +
write dx (+ read r, write dr for residual), the per-group statistics being negligible, over imnet's
time; against the device's copy bandwidth, 2 x bytes / time of `dst.copy_(src)` on 1 GiB. imnet's
two-pass kernels actually read x (and dy) twice (stats then apply), so 100 % is out of reach when
the second read misses L2 (tensors over ~50 MB on an H100).

Prints a markdown table. --write appends the rows to BENCHMARKS.md below the line
`<!-- norm_kernels rows -->` (the section must exist).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from benchmarks_md import append_rows, gpu_head
from torch import nn

MARKER = "<!-- norm_kernels rows -->"
METHODS = ("bn", "gn", "gn_compile", "imnet")


def copy_bandwidth(gib: float = 1.0, iters: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def make_step(method: str, c: int, epilogue: str, x, r, dy):
    from imnet.kernels import Act, ChannelsLastGroupNorm

    if method == "bn":
        m = nn.BatchNorm2d(c)
    elif method in ("gn", "gn_compile"):
        m = nn.GroupNorm(32, c)
    else:
        m = ChannelsLastGroupNorm(32, c, act=Act.NONE if epilogue == "none" else Act.RELU, any_gpu=True)
    m = m.cuda().to(memory_format=torch.channels_last)
    fused = method == "imnet"

    def forward():
        if fused:
            return m(x, r) if epilogue == "residual" else m(x)
        y = m(x)
        if epilogue == "residual":
            y = y + r
        return torch.relu_(y) if epilogue != "none" else y

    fwd = torch.compile(forward, dynamic=False) if method == "gn_compile" else forward
    inputs = [x, *m.parameters()] + ([r] if epilogue == "residual" else [])

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fwd()
        torch.autograd.grad(y, inputs, dy.to(y.dtype))

    return step


def graphed(step, iters: int):
    """`iters` steps captured as one CUDA graph (after warm-up on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            step()
    return graph.replay


def time_methods(steps: dict, iters: int, repeats: int, cuda_graph: bool,
                 tunes: dict | None = None) -> dict[str, float]:
    """Seconds per step of each method: eager steps, or `iters` steps captured as one CUDA graph;
    `tunes` {method: IMNET_GN_TUNE string}: the launch plan to capture that method's steps under."""
    if not cuda_graph:
        return time_steps(steps, iters, repeats)
    from imnet.kernels.gn import plan

    graphs = {}
    for m, step in steps.items():
        if m not in (tunes or {}):
            graphs[m] = graphed(step, iters)
            continue
        saved = plan.tuning()
        plan.set_tuning(plan.parse_tuning(tunes[m]))
        try:
            graphs[m] = graphed(step, iters)
        finally:
            plan.set_tuning(saved)
    return {m: v / iters for m, v in time_steps(graphs, 1, repeats, warmup=2).items()}


def time_steps(steps: dict, iters: int, repeats: int, warmup: int = 10) -> dict[str, float]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 2])
    p.add_argument("--epilogue", choices=("none", "relu", "residual"), default="none")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="leave out gn_compile to skip Inductor's compile per shape (its column reads '-')")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time `--iters` steps captured as one CUDA graph: the GPU's time without the host's "
                        "(eager steps of small layers measure Python and launch overhead)")
    p.add_argument("--tune", nargs="+", default=[], metavar="IMNET_GN_TUNE",
                   help="with --cuda-graph: imnet under these launch plans too, a row each (e.g. local=16)")
    p.add_argument("--write", action="store_true", help=f"append the rows to BENCHMARKS.md below {MARKER}")
    args = p.parse_args()
    if args.cuda_graph and "gn_compile" in args.methods:
        p.error("--cuda-graph times bn, gn and imnet (leave out gn_compile)")
    if args.tune and not args.cuda_graph:
        p.error("--tune needs --cuda-graph (eager steps would replan at every call)")
    from imnet.kernels.gn.plan import parse_tuning

    for text in args.tune:
        try:
            parse_tuning(text)
        except ValueError as e:
            p.error(str(e))
    if not {"bn", "imnet"} <= set(args.methods):
        p.error("--methods must include bn and imnet (the ratios)")
    if not torch.cuda.is_available():
        print("norm_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    from imnet import arch

    torch.backends.cudnn.benchmark = True
    bw = copy_bandwidth()
    gpu = torch.cuda.get_device_name()

    def head_for(tune=None):
        return f"{gpu_head(tune=tune)} | {args.epilogue}{' (CUDA graph)' if args.cuda_graph else ''}"

    head = head_for()
    tunes = {f"imnet[{text}]": text for text in args.tune}   # extra method -> its plan
    print(f"# copy bandwidth {bw / 1e9:.0f} GB/s on {gpu}")
    print("| date | GPU | versions | epilogue | N | C | HxW | layers | bn ms | gn ms | gn_compile ms | imnet ms "
          "| imnet GB/s | imnet % copy BW | imnet / bn time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.batches:
        for (c, h, w), count in arch.norm_shapes("resnet50").items():
            gen = torch.Generator(device="cuda").manual_seed(c * h + n)
            cl = torch.channels_last
            x = (3 * torch.randn(n, c, h, w, device="cuda", generator=gen) + 5).to(torch.bfloat16)
            x = x.contiguous(memory_format=cl).requires_grad_()
            dy = torch.randn(n, c, h, w, device="cuda", generator=gen).to(torch.bfloat16).contiguous(memory_format=cl)
            r = None
            if args.epilogue == "residual":
                r = torch.randn(n, c, h, w, device="cuda", generator=gen).to(torch.bfloat16)
                r = r.contiguous(memory_format=cl).requires_grad_()
            torch._dynamo.reset()  # a fresh compile per shape (the cache is per code object, 8 entries)
            steps = {m: make_step(m, c, args.epilogue, x, r, dy) for m in METHODS if m in args.methods}
            steps.update({m: make_step("imnet", c, args.epilogue, x, r, dy) for m in tunes})
            t = time_methods(steps, args.iters, args.repeats, args.cuda_graph, tunes)
            tensors = 5 + (2 if args.epilogue == "residual" else 0)
            for m, head_m in [("imnet", head)] + [(m, head_for(text)) for m, text in tunes.items()]:
                gbs = tensors * x.numel() * x.element_size() / t[m]
                row = (f"| {head_m} | {n} | {c} | {h}x{w} | {count} | "
                       + " | ".join(f"{t[k if k != 'imnet' else m] * 1e3:.3f}" if k in t else "-" for k in METHODS)
                       + f" | {gbs / 1e9:.0f} | {100 * gbs / bw:.0f} % | {t[m] / t['bn']:.2f} |")
                print(row, flush=True)
                rows.append(row)
    if args.write:
        append_rows(MARKER, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
