"""The Triton GroupNorm kernels compile for an H100, on this CPU machine, with the installed Triton.

The interpreter (tests/test_gn_kernels.py) checks what the kernels compute but never runs Triton's
compiler, which rejects programs the interpreter accepts (a loop-carried value changing type, a
block shape that is not a power of two, ...). Here `python -m imnet.kernels.precompile` takes the
launch plan of every distinct ResNet-50 norm shape at 2 and 32 images, in bfloat16 and float32 and
each epilogue, with the H100's 132 SMs, and has Triton's JIT compile every distinct launch for sm_90
down to a cubin; ptxas -v must report no register spills. Registers and compile times of the full
set (all batches, dtypes and the local kernels' plans) are in BENCHMARKS.md.
"""

import gc
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from imnet.kernels import precompile, reference
from imnet.kernels.common import Act
from imnet.kernels.gn import launch, ops, plan

KERNELS = set(precompile.KERNELS)


def _cli(*args, cache, timeout=900, tune=""):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["TRITON_CACHE_DIR"] = str(cache)
    env["IMNET_GN_TUNE"] = tune
    return subprocess.run([sys.executable, "-m", "imnet.kernels.precompile", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _cubins(cache) -> set:
    return {p for p in cache.rglob("*.cubin")}


def test_every_resnet50_launch_compiles_for_sm90_without_spills(tmp_path):
    cache = tmp_path / "cache"
    r = _cli("--arch", "90", "--sms", "132", "--batches", "2", "32", "--dtypes", "bf16", "fp32", "--jobs", "2",
             "--report", cache=cache)
    assert r.returncode == 0, r.stderr
    count = int(re.search(r"precompile: (\d+) kernel specializations for sm_90 \(132 SMs\)", r.stdout).group(1))
    reported = dict(re.findall(r"  (_\w+): \d+ variants, registers \d+-\d+, spill bytes (\d+)", r.stdout))
    assert set(reported) == KERNELS, r.stdout
    assert all(v == "0" for v in reported.values()), r.stdout
    assert len(_cubins(cache)) == count > 300
    print("\n" + r.stdout)


def test_local_kernels_compile_for_sm90_without_spills(tmp_path):
    """IMNET_GN_TUNE=local=64 (the widest blocks: 64 lanes, a 64 x 64 group-membership mask) at 256
    images, where the plan picks them for every layer of 256 or more channels; the two ReLU epilogues
    (the most registers)."""
    r = _cli("--arch", "90", "--sms", "132", "--batches", "256", "--dtypes", "bf16", "--epilogues", "relu",
             "residual_relu", "--jobs", "2", "--report", cache=tmp_path, tune="local=64")
    assert r.returncode == 0, r.stderr
    assert "IMNET_GN_TUNE=local=64" in r.stdout
    reported = dict(re.findall(r"  (_\w+): \d+ variants, registers \d+-\d+, spill bytes (\d+)", r.stdout))
    assert {"_fwd_local", "_bwd_local", "_bwd_combine"} <= set(reported), r.stdout
    assert all(v == "0" for v in reported.values()), r.stdout
    print("\n" + r.stdout)


def test_record_follows_the_launch_plan():
    """One shape: the six kernels, with the block sizes of the H100 plan and the split at 2 images."""
    from imnet.kernels.gn import plan as gn_plan

    launches = precompile.record([(256, 56, 56)], [2], [torch.bfloat16], sms=132)
    plan = gn_plan.plan(2, 256, 56 * 56, 32, 132)
    assert plan.chunks > 1
    assert {launch.kernel for launch in launches} == KERNELS
    stats = [launch for launch in launches if launch.kernel == "_fwd_stats"]
    assert [dict(launch.meta) for launch in stats] == [{"BLOCK_HW": plan.block_hw, "BLOCK_C": plan.block_c}]
    assert stats[0].args[0] == torch.bfloat16 and stats[0].num_warps == plan.num_warps
    applies = {dict(launch.meta)["ACT"] for launch in launches if launch.kernel == "_fwd_apply"}
    assert applies == {0, 1, 2}  # plain, ReLU, residual + ReLU


def test_without_a_gpu_the_target_must_be_named(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --arch and --sms default to it")
    r = _cli("--batches", "2", cache=tmp_path)
    assert r.returncode == 2 and "give the target's --arch and --sms" in r.stderr


class _RecordingDriver(precompile.DryRunDriver):
    """Compiles for sm_90; each launch is recorded as (kernel hash, grid, arguments, stream) and not
    run. The current stream is `stream`."""

    def __init__(self):
        super().__init__(90)
        self.launches = []
        self.stream = 0
        # Triton >= 3.7 unloads a compiled kernel's module when the kernel is freed (CompiledKernel.__del__).
        self.utils.unload_module = lambda module: None

    def launcher_cls(self, src, metadata):
        def launch(gx, gy, gz, stream, function, packed, launch_metadata, enter, exit_, *args):
            spec = [(a.dtype, tuple(a.shape), a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args]
            self.launches.append((metadata.hash, (gx, gy, gz), spec, stream))
            if enter is not None:  # as Triton's C launcher does
                enter(launch_metadata)
        return launch

    def get_current_stream(self, device=None):
        return self.stream


class _NoJit:
    def __getitem__(self, grid):
        raise AssertionError("a repeated launch went through Triton's JIT")

    def __getattr__(self, name):
        raise AssertionError(f"a repeated launch asked Triton's JIT for {name}")


LOCAL_LAUNCHES = ["_fwd_local", "_bwd_local", "_bwd_combine"]


@pytest.mark.parametrize("n, c, h, w, dtype, act, residual, unaligned_weight, tune", [
    (2, 64, 7, 7, torch.float32, Act.NONE, False, False, ""),
    (1, 128, 5, 5, torch.bfloat16, Act.RELU, False, True, ""),
    (2, 256, 3, 3, torch.float16, Act.RELU, True, False, ""),
    (4, 256, 3, 3, torch.bfloat16, Act.RELU, True, False, "local=16"),
])
def test_repeated_launches_equal_the_jits(monkeypatch, tuned, tmp_path, n, c, h, w, dtype, act, residual,
                                          unaligned_weight, tune):
    """The launch cache (launch.Replay) starts the same compiled kernels with the same grid,
    stream and arguments as Triton's JIT, without asking the JIT again; also for a weight that is not
    16-byte aligned (another specialization for the JIT), and for the local kernels' launches."""
    names = LOCAL_LAUNCHES if tune else list(precompile.KERNELS)
    tuned(tune)
    assert plan.plan(n, c, h * w, 32, 1).local == bool(tune)
    rec = _recording(monkeypatch, tmp_path)
    try:
        x, weight, bias, dy, r = reference.random_inputs(n, c, h, w, dtype, torch.Generator().manual_seed(0),
                                                         residual)
        if unaligned_weight:
            weight = torch.cat([torch.zeros(1), weight])[1:]
            assert weight.data_ptr() % 16 != 0

        def layer():
            xg = x.detach().requires_grad_()
            y = ops.group_norm(xg, 32, weight.requires_grad_(), bias.requires_grad_(), 1e-5, act=act,
                               residual=r)
            torch.autograd.grad(y, (xg, weight, bias), dy)

        layer()
        first = list(rec.launches)
        assert len(first) == len(names)  # split: 3 forward, 3 backward; local: 1 forward, 2 backward
        monkeypatch.setattr(launch, "jit", lambda interpret, own_sum=False: {name: _NoJit() for name in names})
        rec.launches.clear()
        layer()
        assert rec.launches == first
        rec.stream = 7  # the replay launches on the stream current at the call
        rec.launches.clear()
        layer()
        assert [launch[:3] for launch in rec.launches] == [launch[:3] for launch in first]
        assert {launch[3] for launch in rec.launches} == {7} and {launch[3] for launch in first} == {0}
        # A profiler's launch hook (Triton's proton adds one like this) still sees every launch.
        from triton import knobs
        seen = []
        hook = seen.append
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            rec.launches.clear()
            layer()
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        assert [launch[:3] for launch in rec.launches] == [launch[:3] for launch in first]
        assert [m.get()["name"] for m in seen] == names
    finally:
        ops.forget()


def _recording(monkeypatch, cache):
    """A _RecordingDriver as Triton's driver, the compiler (not the interpreter), no kernels compiled
    or planned before (kernels an earlier test compiled launch through its own driver)."""
    from triton.runtime import driver

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    rec = _RecordingDriver()
    monkeypatch.setattr(driver, "_active", rec)
    ops.forget()
    for own_sum in (False, True):
        for fn in launch.jit(False, own_sum).values():
            fn.device_caches.clear()
    gc.collect()
    return rec


def test_without_the_fast_path_every_launch_goes_through_the_jit(monkeypatch, tmp_path):
    """Where the Triton internals the fast path needs are not as expected (launch.FAST_PATH_PROBLEM),
    one warning names the Triton version, every launch goes through the public JIT (nothing kept for
    replay) and the kernels sum with their own combine function: the same launches, twice."""
    import triton

    monkeypatch.setattr(launch, "FAST_PATH_PROBLEM", "a stand-in problem")
    monkeypatch.setattr(launch, "_warned", False)
    rec = _recording(monkeypatch, tmp_path)
    x, weight, bias, dy, r = reference.random_inputs(2, 64, 3, 3, torch.float32, torch.Generator().manual_seed(0),
                                                     True)
    try:
        def layer():
            xg = x.detach().requires_grad_()
            y = ops.group_norm(xg, 32, weight.requires_grad_(), bias.requires_grad_(), 1e-5, act=Act.RELU,
                               residual=r)
            torch.autograd.grad(y, (xg, weight, bias), dy)

        with pytest.warns(RuntimeWarning) as caught:
            layer()
            layer()
        assert [str(w.message) for w in caught] == [
            f"imnet GroupNorm: Triton {triton.__version__} is not what the kernels' fast launch path expects "
            "(a stand-in problem); launching through Triton's JIT instead (same kernels, more host time per launch)"]
        assert len(rec.launches) == 12 and rec.launches[:6] == rec.launches[6:]
        assert ops.cached() and not any(ops.cached())   # no compiled kernels kept
        own = launch.jit(False, True)["_fwd_stats"]
        assert own.device_caches and not launch.jit(False, False)["_fwd_stats"].device_caches
    finally:
        ops.forget()



def test_a_real_launch_loads_what_precompile_compiled(monkeypatch, tmp_path):
    """The point of precompile: a launch through Triton's JIT (kernel[grid](...), as in training, not
    JITFunction.warmup) looks up the very cache entries precompile wrote, so the first step on an H100
    compiles nothing. Precompiled here for sm_90 / 132 SMs at 2 images, fp32, 32x32 images; then, in
    this process, forward + backward of two of those norm layers in each epilogue through the JIT with
    the recording driver (sm_90, nothing runs) and the H100's SM count in the launch plan. Last,
    precompile run again finds everything in the cache too."""
    from triton.runtime import driver

    from imnet import arch

    shapes = [(64, 32, 32), (2048, 4, 4)]  # the first and last of ResNet-50's at 32x32 images
    assert set(shapes) <= set(arch.norm_shapes("resnet50", 32))
    cache = tmp_path / "cache"
    args = ("--arch", "90", "--sms", "132", "--batches", "2", "--dtypes", "fp32", "--image-size", "32", "--jobs", "2")
    r = _cli(*args, cache=cache)
    assert r.returncode == 0, r.stderr
    before = {p: p.stat().st_mtime_ns for p in _cubins(cache)}
    assert before
    hashes = {json.loads(p.with_suffix(".json").read_text())["hash"] for p in before}  # each kernel's key

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    rec = _RecordingDriver()
    assert rec.get_current_target().arch == 90  # what precompile --arch 90 compiled for
    monkeypatch.setattr(driver, "_active", rec)
    monkeypatch.setattr(ops, "sm_count", lambda device: 132)  # CPU tensors: the H100's launch plan

    def forget_kernels():
        """The JIT's and the launch caches' kernels, as in a new process; freed while `rec` is the driver
        (Triton 3.8 has the driver unload a kernel that is freed)."""
        ops.forget()
        for fn in launch.jit(False).values():
            fn.device_caches.clear()
        gc.collect()

    forget_kernels()
    try:
        for c, h, w in shapes:
            for act, residual in ((Act.NONE, False), (Act.RELU, False), (Act.RELU, True)):
                x, weight, bias, dy, res = reference.random_inputs(2, c, h, w, torch.float32,
                                                                   torch.Generator().manual_seed(0), residual)
                xg, wg, bg = (t.requires_grad_() for t in (x, weight, bias))
                rec.launches.clear()
                y = ops.group_norm(xg, 32, wg, bg, 1e-5, act=act, residual=res)
                torch.autograd.grad(y, (xg, wg, bg), dy)
                assert len(rec.launches) == 6, (c, h, w, act, residual)  # 3 forward, 3 backward
                # Each kernel launched is one precompile wrote.
                assert {launch[0] for launch in rec.launches} <= hashes, (c, h, w, act, residual)
        assert {p: p.stat().st_mtime_ns for p in _cubins(cache)} == before  # nothing compiled
    finally:
        forget_kernels()
    assert _cli(*args, cache=cache).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in _cubins(cache)} == before
