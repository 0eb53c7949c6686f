"""Host (CPU) time to issue one norm + ReLU layer's forward + backward as ResNet-50 runs it: BN,
native GN and imnet's Triton GN.

    python bench/gn_host_overhead.py [--iters 2000] [--repeats 5] [--write]

At small batches a GPU finishes a ResNet-50 step faster than Python issues it: about 10 ms at 32
images per H100, with 53 norm layers in it. What a norm layer costs the host then decides the
speed. This measures it without a GPU: Triton's driver is replaced by imnet.kernels.precompile's
DryRunDriver, so the kernels really compile (for sm_90) and every Python step of a Triton launch runs
(argument binding, specialization, kernel-cache lookup), except the driver's own C launch call. The
tensors are tiny CPU tensors (1 x 64 x 2 x 2), so allocation and arithmetic stay negligible against
the dispatch; the launch count per layer does not depend on the shape.

Each layer is the modules the model calls (forward, then torch.autograd.grad for x, gamma, beta):
  bn      nn.BatchNorm2d (training mode) then nn.ReLU(inplace=True): the layer GN has to match.
          Here it runs torch's CPU kernels on the tiny tensors, so its time is dispatch plus a little
          arithmetic, not cuDNN's host path (not measured here).
  native  nn.GroupNorm(32) then nn.ReLU(inplace=True) (2 kernels + 2 for backward on a GPU)
  imnet   ChannelsLastGroupNorm(32, act=Act.RELU): the module's dispatch (kernel_applies takes its CPU
          branch here, the environment read replaced by True), the autograd Function, 3 Triton
          launches forward, 2 or 3 backward (the combine launch also sums dgamma, dbeta); with
          IMNET_GN_TUNE=local=16 (this tiny layer then takes the local kernels) 1 forward, 2 backward

Median over `--repeats` alternating runs of `--iters` layers each, one thread. --write appends the
row to BENCHMARKS.md below `<!-- gn_host_overhead rows -->`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from benchmarks_md import alternating_rounds, append_rows, cpu_head
from torch import nn

MARKER = "<!-- gn_host_overhead rows -->"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.runtime import driver

    import imnet.kernels
    from imnet.kernels import Act, ChannelsLastGroupNorm
    from imnet.kernels.precompile import DryRunDriver

    driver.set_active(DryRunDriver(90))
    imnet.kernels.interpreting = lambda: True  # kernel_applies: CPU tensors go to the (dry-run) kernels
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    layers = {"bn": nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(inplace=True)),
              "native": nn.Sequential(nn.GroupNorm(32, 64), nn.ReLU(inplace=True)),
              "imnet": ChannelsLastGroupNorm(32, 64, act=Act.RELU)}

    def method(layer):
        inputs = (x, layer.weight if hasattr(layer, "weight") else layer[0].weight,
                  layer.bias if hasattr(layer, "bias") else layer[0].bias)
        return lambda: torch.autograd.grad(layer(x), inputs, dy)

    methods = {name: method(layer) for name, layer in layers.items()}
    times = alternating_rounds(methods, a.repeats, a.iters)  # the warm-up compiles imnet's kernels
    us = {k: statistics.median(v) for k, v in times.items()}
    from imnet.kernels.gn.plan import plan, tuning

    tune = f", IMNET_GN_TUNE={tuning()} ({'local kernels' if plan(1, 64, 4, 32, 1).local else 'split plan'})" \
        if str(tuning()) else ""
    row = (f"| {cpu_head()}, triton {triton.__version__}{tune}, median of {a.repeats} x {a.iters} | {us['bn']:.0f} "
           f"| {us['native']:.0f} | {us['imnet']:.0f} | {us['imnet'] / us['native']:.2f}x "
           f"| {us['imnet'] / us['bn']:.2f}x | {53 * (us['imnet'] - us['bn']) / 1e3:.1f} |")
    print("| setup | bn us/layer | native us/layer | imnet us/layer | imnet/native | imnet/bn "
          "| imnet's extra host ms per ResNet-50 step over bn (53 layers) |")
    print(row)
    if a.write:
        append_rows(MARKER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
