"""Host time of imnet's GroupNorm + ReLU layer (forward + backward), this tree against a git revision,
both in one process, alternating: a refactor's cost without the run-to-run noise of two processes.

    python bench/gn_host_ab.py REV [--rounds 11] [--iters 2000] [--write]

REV's `imnet/` is extracted with `git archive` into a temporary folder as the package `imnet_old`
(its `imnet` imports rewritten), so the two versions load side by side. The layer and the dry-run
driver are bench/gn_host_overhead.py's (kernels compiled for sm_90, every Python step of a launch,
no GPU). Each round times `--iters` layers of each version and of BatchNorm2d + ReLU; the figure is
the median over rounds of new/old. --write appends the row to BENCHMARKS.md below
`<!-- gn_host_ab rows -->`.
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch
from benchmarks_md import alternating_rounds, append_rows, cpu_head

MARKER = "<!-- gn_host_ab rows -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract_as_imnet_old(rev: str, dest: str) -> None:
    """REV's imnet/ under dest/imnet_old, with every `imnet` import naming imnet_old."""
    tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "imnet"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    os.rename(os.path.join(dest, "imnet"), os.path.join(dest, "imnet_old"))
    for folder, _, files in os.walk(os.path.join(dest, "imnet_old")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\b(from|import) imnet\b", r"\1 imnet_old", text)
                text = re.sub(r"\bimnet\.(?=[a-z_])", "imnet_old.", text)
                with open(path, "w") as f:
                    f.write(text)


def layer_fn(kernels_pkg, x, dy):
    """forward + backward of ChannelsLastGroupNorm(32, 64) with the fused ReLU, from that package."""
    act = getattr(kernels_pkg, "Act", None)
    m = kernels_pkg.ChannelsLastGroupNorm(32, 64, act=act.RELU if act is not None else "relu")
    return lambda: torch.autograd.grad(m(x), (x, m.weight, m.bias), dy)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the git revision to compare with (e.g. the commit before a refactor)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--write", action="store_true")
    a = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.runtime import driver

    tmp = tempfile.mkdtemp(prefix="gn_host_ab_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    extract_as_imnet_old(a.rev, tmp)
    sys.path.insert(0, tmp)
    import imnet_old.kernels as old

    import imnet.kernels as new
    from imnet.kernels.precompile import DryRunDriver

    driver.set_active(DryRunDriver(90))
    for pkg in (new, old):  # kernel_applies: CPU tensors go to the (dry-run) kernels
        for name in ("interpreting", "_interpret"):
            if hasattr(pkg, name):
                setattr(pkg, name, lambda: True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(1, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU(inplace=True))
    fns = {"old": layer_fn(old, x, dy), "new": layer_fn(new, x, dy),
           "bn": lambda: torch.autograd.grad(bn(x), (x, bn[0].weight, bn[0].bias), dy)}
    times = alternating_rounds(fns, a.rounds, a.iters, warmup=30)
    us = {k: statistics.median(v) for k, v in times.items()}
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    row = (f"| {cpu_head()}, triton {triton.__version__}, {a.rounds} rounds x {a.iters} | {a.rev} "
           f"| {head.strip()} (+ working tree) "
           f"| {us['old']:.0f} | {us['new']:.0f} | {us['bn']:.0f} | {statistics.median(ratios):.3f} "
           f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    print("| setup | old | new | old us/layer | new us/layer | bn us/layer | new/old per round: median (range) |")
    print(row)
    if a.write:
        append_rows(MARKER, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
