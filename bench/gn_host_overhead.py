"""Host (CPU) time to issue one GroupNorm layer's forward + backward: imnet's Triton path vs native.

    python bench/gn_host_overhead.py [--iters 2000] [--repeats 5] [--write]

At small batches a GPU finishes a ResNet-50 step faster than Python issues it: about 10 ms at 32
images per H100, with 53 norm layers in it. What a norm layer costs the host then decides the
speed. This measures it without a GPU: Triton's driver is replaced by imnet.kernels.precompile's
DryRunDriver, so the kernels really compile (for sm_90) and every Python step of a Triton launch runs
(argument binding, specialization, kernel-cache lookup), except the driver's own C launch call. The
tensors are tiny CPU tensors (1 x 64 x 2 x 2), so allocation and arithmetic stay negligible against
the dispatch; the launch count per layer does not depend on the shape.

  bn      relu(F.batch_norm(x)) in training mode, then torch.autograd.grad for x, gamma, beta: the
          layer GN has to match. Here it runs torch's CPU kernels on the tiny tensors, so its time
          is dispatch plus a little arithmetic, not cuDNN's host path (not measured here).
  native  relu(F.group_norm(x)), the same gradients (2 kernels + 2 for backward on a GPU)
  imnet   the same through imnet.kernels.group_norm(act="relu"): its autograd Function, the launch
          plan, 3 Triton launches forward, 3 backward and the parameter-gradient sum

Median over `--repeats` alternating runs of `--iters` layers each, one thread. --write appends the
row to BENCHMARKS.md below `<!-- gn_host_overhead rows -->`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks_md import append_rows

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

    from imnet.kernels import group_norm as gnk
    from imnet.kernels.precompile import DryRunDriver

    driver.set_active(DryRunDriver(90))
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 2, 2, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, generator=gen).requires_grad_()
    b = torch.randn(64, generator=gen).requires_grad_()
    dy = torch.randn(1, 64, 2, 2, generator=gen).contiguous(memory_format=torch.channels_last)

    def bn():
        torch.autograd.grad(torch.relu(F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)), (x, w, b), dy)

    def native():
        torch.autograd.grad(torch.relu(F.group_norm(x, 32, w, b, 1e-5)), (x, w, b), dy)

    def imnet():
        torch.autograd.grad(gnk.group_norm(x, 32, w, b, 1e-5, act="relu"), (x, w, b), dy)

    methods = {"bn": bn, "native": native, "imnet": imnet}
    for f in methods.values():  # compile (imnet) and warm up
        for _ in range(20):
            f()
    times = {k: [] for k in methods}
    for _ in range(a.repeats):
        for name, f in methods.items():
            t0 = time.perf_counter()
            for _ in range(a.iters):
                f()
            times[name].append((time.perf_counter() - t0) / a.iters * 1e6)
    us = {k: statistics.median(v) for k, v in times.items()}
    row = (f"| {datetime.date.today()}, CPU {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__}, "
           f"triton {triton.__version__}, median of {a.repeats} x {a.iters} | {us['bn']:.0f} | {us['native']:.0f} | "
           f"{us['imnet']:.0f} | {us['imnet'] / us['native']:.2f}x | {us['imnet'] / us['bn']:.2f}x | "
           f"{53 * (us['imnet'] - us['bn']) / 1e3:.1f} |")
    print("| setup | bn us/layer | native us/layer | imnet us/layer | imnet/native | imnet/bn "
          "| imnet's extra host ms per ResNet-50 step over bn (53 layers) |")
    print(row)
    if a.write:
        append_rows(MARKER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
