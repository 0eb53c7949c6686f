"""Compile the GroupNorm kernels ahead of time into Triton's on-disk cache, with or without a GPU.

    python -m imnet.kernels.precompile [--arch 90 --sms 132] [--batches 1 2 32 256]
                                       [--dtypes bf16 fp16 fp32] [--epilogues none relu residual_relu]
                                       [--jobs 8] [--report]

Triton compiles a kernel the first time it is launched with a new specialization (block sizes,
dtypes, 16-byte alignment, integer arguments equal to 1), one after another, in the training
process: for ResNet-50 at a few batch sizes that is hundreds of compilations. This reads the launch
plan (imnet.kernels.gn.plan) of every distinct ResNet-50 norm input shape, batch size, dtype and
epilogue, and has Triton's JIT compile the distinct launches
(`JITFunction.warmup`) in `--jobs` processes. The results land in Triton's cache
(TRITON_CACHE_DIR, default ~/.triton/cache), keyed as a later launch on that GPU kind looks them
up, so the training process then loads instead of compiling.

No GPU is needed: the workers give Triton a stand-in driver that reports the target (CUDA compute
capability `--arch`, warp size 32) and compiles only; with a GPU, `--arch` and `--sms` default to
the current device's. Run it on a machine with the same Triton version as the GPU nodes (the
cache key holds Triton's version and ptxas's). `--report` also prints each kernel's registers per
thread and spill bytes from ptxas -v (tests/test_gn_compile.py asserts no spills on sm_90). The
launch plan is the one the training process will use: the same IMNET_GN_TUNE (plan.Tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from imnet import arch
from imnet.dtypes import DTYPES
from imnet.kernels.common import Act
from imnet.kernels.gn import plan

ACTS = {a.name.lower(): a for a in Act}   # --epilogues: none relu residual_relu
KERNELS = ("_fwd_stats", "_fwd_combine", "_fwd_apply", "_bwd_reduce", "_bwd_combine", "_bwd_apply")
LOCAL_KERNELS = ("_fwd_local", "_bwd_local")   # launched only with IMNET_GN_TUNE=local=...
_FLOAT32_ROLES = ("stats", "part", "weight", "bias", "dgamma", "dbeta")   # the rest: the activations' dtype


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton's JIT specializes it. `args` holds torch dtypes in place of tensors
    (JITFunction.warmup turns them into 16-byte-aligned mock tensors) and the integer values."""
    kernel: str
    args: tuple
    meta: tuple          # ((constexpr name, value), ...)
    num_warps: int

    def key(self) -> tuple:
        """What the JIT's specialization sees: the integers only as 1 / divisible by 16 / other."""
        spec = tuple(a if not isinstance(a, int) or isinstance(a, bool)
                     else ("one" if a == 1 else "d16" if a % 16 == 0 else "int") for a in self.args)
        return self.kernel, spec, self.meta, self.num_warps


def record(shapes, batches, dtypes, sms: int, groups: int = 32, acts=tuple(Act),
           tuning: plan.Tuning | None = None) -> list[Launch]:
    """The distinct launches of forward + backward (all gradients) for every (C, H, W) shape x batch x
    dtype x epilogue (`acts`), from the launch plan of a GPU with `sms` multiprocessors and `tuning`
    (default: the current one). Nothing is compiled. The parameters are float32, as in the trainer."""
    launches: dict = {}
    for n in batches:
        for c, h, w in shapes:
            for dtype in dtypes:
                for act in acts:
                    fwd = plan.forward(n, c, h * w, groups, 1e-5, act, sms, None, tuning)
                    bwd = plan.backward(n, c, h * w, groups, act, sms, None, True, True, tuning)
                    for step in fwd.steps + bwd.steps:
                        args = tuple(torch.float32 if r in _FLOAT32_ROLES else dtype for r in step.tensors)
                        launch = Launch(step.name, args + step.scalars, tuple(sorted(step.constexprs.items())),
                                        step.num_warps)
                        launches.setdefault(launch.key(), launch)
    return list(launches.values())


class DryRunDriver:
    """What Triton's JIT asks of its driver, for a GPU that is not there: it reports the target
    (compute capability `arch`, warp size 32), so kernels compile for it, and a launch of a compiled
    kernel does everything on the Python side and then nothing (bench/gn_host_overhead.py times that).
    Install with triton.runtime.driver.set_active(DryRunDriver(90))."""

    def __init__(self, arch: int, sms: int = 132):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _DryRunUtils(sms)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    @staticmethod
    def launcher_cls(src, metadata):
        return _no_launch


def _no_launch(*args, **kwargs):
    return None


class _DryRunUtils:
    def __init__(self, sms: int):
        self.sms = sms

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads: placeholders

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": self.sms}


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    return regs, sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))


def _compile_share(share: list[Launch], arch: int, report: bool) -> list[tuple]:
    """Worker: compile these launches through the JIT (into the on-disk cache)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from triton.runtime import driver

    from imnet.kernels.gn import launch as gn_launch

    driver.set_active(DryRunDriver(arch))
    fns = gn_launch.jit(False)  # the JIT itself: warmup compiles without launching
    out = []
    for launch in share:
        kernel = fns[launch.kernel].warmup(*launch.args, grid=(1,), num_warps=launch.num_warps, **dict(launch.meta))
        regs, spills = _ptxas_report(kernel.asm["ptx"], arch) if report else (None, None)
        out.append((launch.kernel, dict(launch.meta), launch.num_warps, regs, spills))
    return out


def compile_all(launches: list[Launch], arch: int, jobs: int, report: bool = False, pool=None) -> list[tuple]:
    """Compile in `jobs` fresh processes (spawned: Triton's compiler in forked children of a process
    that already ran torch is not safe), or in `pool` (from `pool(jobs)`, to reuse across calls).
    Returns (kernel, constexprs, num_warps, registers, spills)."""
    jobs = max(1, min(jobs, len(launches)))
    shares = [launches[i::jobs] for i in range(jobs)]
    if pool is not None:
        parts = pool.starmap(_compile_share, [(s, arch, report) for s in shares])
    else:
        with make_pool(jobs) as own:
            parts = own.starmap(_compile_share, [(s, arch, report) for s in shares])
    return [r for part in parts for r in part]


def make_pool(jobs: int):
    """Worker processes for compile_all. They compile the launches they are given, whatever tuning."""
    return multiprocessing.get_context("spawn").Pool(jobs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, help="CUDA compute capability x10 (90: H100/H200); default: this GPU's")
    p.add_argument("--sms", type=int, help="multiprocessors, for the launch plan (132: H100); default: this GPU's")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 32, 256], help="images per GPU")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--epilogues", nargs="+", default=list(ACTS), choices=list(ACTS))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--report", action="store_true", help="print registers and spills per kernel (ptxas -v)")
    a = p.parse_args(argv)
    if a.arch is None or a.sms is None:
        if not torch.cuda.is_available():
            p.error("no GPU here: give the target's --arch and --sms (an H100: --arch 90 --sms 132)")
        props = torch.cuda.get_device_properties(0)
        a.arch = a.arch or props.major * 10 + props.minor
        a.sms = a.sms or props.multi_processor_count
    try:
        import triton
    except ImportError:
        print("precompile: Triton is not installed (the kernels need it)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    launches = record(list(arch.norm_shapes("resnet50", a.image_size)), a.batches, [DTYPES[d] for d in a.dtypes], a.sms,
                      acts=[ACTS[e] for e in a.epilogues])
    results = compile_all(launches, a.arch, a.jobs, a.report)
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    print(f"precompile: {len(results)} kernel specializations for sm_{a.arch} ({a.sms} SMs) in "
          f"{time.perf_counter() - t0:.0f} s with {a.jobs} processes, triton {triton.__version__}, cache {cache}"
          + (f", IMNET_GN_TUNE={plan.tuning()}" if str(plan.tuning()) else ""))
    if a.report:
        for name in KERNELS + LOCAL_KERNELS:
            mine = [r for r in results if r[0] == name]
            if mine:
                print(f"  {name}: {len(mine)} variants, registers {min(r[3] for r in mine)}-{max(r[3] for r in mine)}, "
                      f"spill bytes {max(r[4] for r in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
