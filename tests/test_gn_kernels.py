"""The channels-last Triton GroupNorm (imnet.kernels), run on the CPU by Triton's interpreter.

Every comparison is against torch.nn.functional.group_norm in float64 on the same data (the input
already rounded to its dtype), for the output and every gradient. Inputs are x = 3*randn + 5 (a
non-zero mean and a non-unit scale catch an unstable variance), random gamma/beta and dy.

Error = max |kernel - float64| / max |float64|, per tensor. Measured on this interpreter (torch 2.14.1,
triton 3.8.0), worst over the cases below (and a wider 117-case sweep) -> bound set here:
  float32  outputs (y, dx, d residual)  2.2e-7             -> 1e-5
  float16  outputs                      4.7e-4             -> 2e-3   (fp16 rounding: 2^-11 = 4.9e-4)
  bfloat16 outputs                      6.3e-3 (7.5e-3)    -> 1.5e-2 (the interpreter TRUNCATES
                                        float32 -> bf16: 1 ulp = 2^-7 = 7.8e-3; a GPU rounds to
                                        nearest, half that)
  dgamma, dbeta (float32 parameters), any input dtype: 3.0e-7 -> 1e-5: statistics and accumulation
  are float32 whatever the input dtype.
TRITON_INTERPRET=1 is set per test (the autouse fixture), not at import for the whole process:
pytest imports every test file before running any, so a process-wide TRITON_INTERPRET=1 would send
every other test's ChannelsLastGroupNorm (and their subprocesses, which inherit the environment)
through the interpreter. imnet.kernels decorates its kernels on first use in each mode, so it does not
matter who imported imnet.norm / imnet.kernels first.
"""

import contextlib
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imnet import arch, config, kernels, models, norm
from imnet.kernels import ChannelsLastGroupNorm, kernel_applies, reference
from imnet.kernels.common import Act
from imnet.kernels.gn import launch, ops, plan
from imnet.models.resnet import Bottleneck, fuse_norm_act

OUT_BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
PARAM_BOUND = 1e-5
DTYPES = list(OUT_BOUND)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.kernels_interpreted()


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _data(n, c, h, w, dtype, seed, residual=False):
    return reference.random_inputs(n, c, h, w, dtype, torch.Generator().manual_seed(seed), residual)


def _check(n, c, h, w, groups, dtype, act=Act.NONE, residual=False, rows_per_chunk=None, seed=0, module=False):
    """Kernel forward + backward vs float64 F.group_norm (+ add, ReLU); returns the errors."""
    x, weight, bias, dy, r = _data(n, c, h, w, dtype, seed, residual)
    ins = [t.clone().requires_grad_() for t in (x, weight, bias) + ((r,) if residual else ())]
    if module:
        m = ChannelsLastGroupNorm(groups, c, act=act)
        with torch.no_grad():
            m.weight.copy_(weight), m.bias.copy_(bias)
        ins[1:3] = [m.weight, m.bias]
        y = m(ins[0], ins[3] if residual else None)
    else:
        y = ops.group_norm(ins[0], groups, ins[1], ins[2], 1e-5, act=act,
                           residual=ins[3] if residual else None, rows_per_chunk=rows_per_chunk)
    assert type(y.grad_fn).__name__ == "GroupNormNHWCBackward"  # the kernels ran, not the fallback
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, ins, dy)
    for name, g in zip(("dx", "dgamma", "dbeta", "dresidual"), grads):
        assert g.dtype == (torch.float32 if name in ("dgamma", "dbeta") else dtype)
    errs = reference.errors_vs_float64(y, grads, ins, dy, groups, 1e-5, act)
    for name, e in errs.items():
        bound = PARAM_BOUND if name in ("dgamma", "dbeta") else OUT_BOUND[dtype]
        assert e <= bound, f"{name}: relative error {e:.2e} > {bound:.0e} ({dtype}, {errs})"
    return errs


# Every ResNet-50 norm width with a small spatial size, then odd sizes and groups from 1 to C.
RN50 = [(2, 64, 8, 8, 32), (1, 128, 4, 4, 32), (2, 256, 4, 4, 32), (1, 512, 2, 2, 32),
        (2, 1024, 2, 2, 32), (1, 2048, 1, 1, 32), (2, 2048, 2, 2, 32)]
ODD = [(2, 64, 7, 7, 32), (1, 24, 3, 5, 4), (2, 32, 4, 4, 1), (2, 32, 4, 4, 2), (2, 32, 4, 4, 32),
       (1, 2048, 1, 1, 1), (1, 6, 5, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", RN50, ids=str)
def test_resnet50_widths(shape, dtype):
    _check(*shape, dtype)


@pytest.mark.parametrize("shape", ODD, ids=str)
def test_odd_sizes_and_groups_1_to_c(shape):
    _check(*shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_odd_sizes_half(dtype):
    _check(2, 64, 7, 7, 32, dtype)
    _check(1, 24, 3, 5, 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 64, 8, 8, 32), (1, 256, 3, 5, 32), (1, 2048, 1, 1, 32), (1, 24, 7, 7, 4)],
                         ids=str)
def test_fused_relu(shape, dtype):
    _check(*shape, dtype, act=Act.RELU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 256, 4, 4, 32), (1, 64, 7, 7, 32), (1, 2048, 1, 1, 32), (1, 24, 3, 5, 4)],
                         ids=str)
def test_fused_residual_relu(shape, dtype):
    _check(*shape, dtype, act=Act.RELU, residual=True)


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("act, residual", [(Act.NONE, False), (Act.RELU, False), (Act.RELU, True)])
def test_spatial_split_path(rows, act, residual):
    """A forced chunk size: 7x7 = 49 rows in chunks of 1, 3 (the last holds 1) or 16."""
    p = plan.plan(2, 64, 49, 32, 1, rows)
    assert p.chunks == -(-49 // rows) > 1
    _check(2, 64, 7, 7, 32, torch.float32, act, residual, rows_per_chunk=rows)
    if rows == 3:
        _check(2, 64, 7, 7, 32, torch.bfloat16, act, residual, rows_per_chunk=rows)


def test_split_and_unsplit_agree():
    x, weight, bias, _, _ = _data(1, 128, 7, 7, torch.float32, 3)
    one = ops.group_norm(x, 32, weight, bias, rows_per_chunk=49)
    assert plan.plan(1, 128, 49, 32, 1, 49).chunks == 1
    for rows in (1, 5, 48):
        torch.testing.assert_close(ops.group_norm(x, 32, weight, bias, rows_per_chunk=rows), one,
                                   atol=1e-5, rtol=1e-5)


def test_stable_statistics_with_a_large_mean():
    """x = randn + 300 in float32: E[x^2] - E[x]^2 in float32 loses the variance (shown below)."""
    g = torch.Generator().manual_seed(5)
    x = _cl(torch.randn(1, 32, 8, 8, generator=g) + 300)
    y = ops.group_norm(x, 4)
    y64 = F.group_norm(x.double(), 4)
    assert reference.relative_error(y, y64) <= 1e-4
    # Negative control: the naive one-pass variance in float32 is far off on the same data.
    xs = x.reshape(1, 4, -1)
    naive_var = (xs * xs).mean(-1) - xs.mean(-1) ** 2
    assert ((naive_var.double() - xs.double().var(-1, unbiased=False)).abs() > 0.01).any()


def test_saved_statistics_are_float32_mean_and_rstd():
    x, _, _, _, _ = _data(2, 64, 5, 5, torch.bfloat16, 1)
    y, stats, launches = ops.forward(x, torch.ones(64), torch.zeros(64), 32, 1e-5, Act.NONE, None, 7)
    mean, rstd = ops.mean_rstd(stats, launches.moff, 2, 32)
    var, mu = torch.var_mean(x.double().reshape(2, 32, -1), dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 32)
    torch.testing.assert_close(mean.double(), mu, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tune", ["", "local=16,programs_per_sm=1"])
@pytest.mark.parametrize("grads", ["x", "params", "none"])
def test_partial_requires_grad(tuned, grads, tune):
    tuned(tune)
    assert plan.plan(2, 32, 9, 8, 1).local == bool(tune)
    x, weight, bias, dy, _ = _data(2, 32, 3, 3, torch.float32, 2)
    x.requires_grad_(grads == "x")
    weight.requires_grad_(grads == "params")
    bias.requires_grad_(grads == "params")
    y = ops.group_norm(x, 8, weight, bias)
    if grads == "none":
        assert not y.requires_grad
        return
    ins = [x] if grads == "x" else [weight, bias]
    got = torch.autograd.grad(y, ins, dy)
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    xr, wr, br = (ref_ins[0], weight, bias) if grads == "x" else (x, *ref_ins)
    want = torch.autograd.grad(F.group_norm(xr, 8, wr, br), ref_ins, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_no_affine():
    x, _, _, dy, _ = _data(1, 16, 4, 4, torch.float32, 4)
    m = ChannelsLastGroupNorm(4, 16, affine=False)
    xi = x.clone().requires_grad_()
    y = m(xi)
    (gx,) = torch.autograd.grad(y, xi, dy)
    xr = x.clone().requires_grad_()
    yr = F.group_norm(xr, 4)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, torch.autograd.grad(yr, xr, dy)[0], atol=1e-5, rtol=1e-5)


def test_module_uses_the_kernels_for_channels_last_and_falls_back_otherwise(monkeypatch):
    errs = _check(2, 64, 4, 4, 32, torch.float32, act=Act.RELU, residual=True, module=True)
    assert max(errs.values()) < 1e-5
    m = ChannelsLastGroupNorm(8, 16)
    x = torch.randn(2, 16, 4, 4) * 3 + 5
    assert not kernel_applies(x)  # NCHW: native GroupNorm, no copies
    assert kernel_applies(_cl(x)) and not kernel_applies(_cl(x).double())
    y = m(x)
    assert type(y.grad_fn).__name__ == "NativeGroupNormBackward0"
    torch.testing.assert_close(y, F.group_norm(x, 8, m.weight, m.bias))
    with monkeypatch.context() as mp:
        mp.setattr(kernels, "MAX_SAMPLE_ELEMENTS", 16 * 4 * 4 - 1)  # a sample too large for 32-bit offsets
        assert not kernel_applies(_cl(x))
        assert type(m(_cl(x)).grad_fn).__name__ == "NativeGroupNormBackward0"
    assert kernel_applies(_cl(x))
    monkeypatch.delenv("TRITON_INTERPRET")  # plain CPU: the reference path, even channels-last
    assert not kernel_applies(_cl(x))
    assert type(m(_cl(x)).grad_fn).__name__ == "NativeGroupNormBackward0"


def test_auto_leaves_gpus_triton_does_not_support_to_native_and_says_so(monkeypatch):
    """A fake CUDA tensor (FakeTensorMode: no GPU needed) on a GPU whose capability and build are
    patched: auto runs the kernels from compute capability 8.0 on NVIDIA, native below and on ROCm;
    gn_impl=triton (any_gpu) runs them everywhere; the run's log says which."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gpu = {"cap": (7, 0), "name": "Tesla V100-SXM2-32GB"}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = torch.device("cuda", 0)
    auto = nn.Sequential(norm.make("gn", 64, impl="auto"), norm.make("gn", 64, impl="auto"))
    forced = nn.Sequential(norm.make("gn", 64, impl="triton"))
    with FakeTensorMode():
        x = _cl(torch.empty(2, 64, 7, 7, device="cuda", dtype=torch.bfloat16))

    def applies():
        monkeypatch.setattr(kernels, "_unsupported", {})   # the per-device answer is cached
        return kernel_applies(x), kernel_applies(x, any_gpu=True)

    assert applies() == (False, True)
    assert kernels.gpu_note(auto, dev) == (
        "model.gn_impl=auto: Tesla V100-SXM2-32GB has compute capability 7.0; Triton supports NVIDIA "
        "GPUs of 8.0 and newer, so GroupNorm is PyTorch's (model.gn_impl=triton runs the kernels anyway)")
    assert kernels.gpu_note(forced, dev) == (
        "warning: model.gn_impl=triton: Tesla V100-SXM2-32GB has compute capability 7.0; Triton supports "
        "NVIDIA GPUs of 8.0 and newer; the Triton kernels run anyway (bench/gn_gpu_check.py checks them on this GPU)")
    assert kernels.gpu_note(nn.Sequential(norm.make("gn", 64, impl="native")), dev) is None
    gpu.update(cap=(9, 0))
    assert kernels.gpu_note(auto, dev) is not None   # asked once per device, like kernel_applies
    assert kernels.gpu_note(auto, torch.device("cpu")) is None
    gpu.update(cap=(8, 0), name="NVIDIA A100-SXM4-80GB")
    assert applies() == (True, True)
    assert kernels.gpu_note(auto, dev) is None and kernels.gpu_note(forced, dev) is None
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert applies() == (False, True)
    assert kernels.gpu_unsupported(torch.device("cuda")) == (
        "NVIDIA A100-SXM4-80GB is a ROCm GPU; imnet's GroupNorm kernels are checked on NVIDIA GPUs only")
    seen = []   # what each module's forward asks kernel_applies
    monkeypatch.setattr(kernels, "kernel_applies", lambda t, any_gpu=False: seen.append(any_gpu) or False)
    for m in (auto[0], forced[0]):
        m(torch.randn(1, 64, 2, 2))
    assert seen == [False, True]


def test_launches_switch_to_the_gpu_of_the_input_when_it_is_not_the_current_one(monkeypatch):
    """Triton launches on the current CUDA device: the kernels of a tensor on cuda:1 while cuda:0 is
    current go through torch.cuda.device(cuda:1) (bench/gn_gpu_check.py runs this on 2 GPUs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with FakeTensorMode():
        x0, x1 = (torch.empty(1, 8, 2, 2, device=f"cuda:{i}") for i in (0, 1))
    ctx = launch.on_device_of(x1)
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    for x in (x0, torch.empty(1, 8, 2, 2)):
        assert isinstance(launch.on_device_of(x), contextlib.nullcontext)


def test_bad_arguments():
    x = _cl(torch.randn(1, 8, 2, 2))
    with pytest.raises(ValueError, match="channels-last"):
        ops.group_norm(x.contiguous(), 2)
    with pytest.raises(ValueError, match="3 groups do not divide 8"):
        ops.group_norm(x, 3)
    with pytest.raises(ValueError, match="use act=Act.RELU"):
        ops.group_norm(x, 2, residual=x)
    with pytest.raises(ValueError, match="act must be"):
        ChannelsLastGroupNorm(2, 8, act="gelu")


# --- launch plan: the split fills an H100 at 1-2 images per GPU ---------------------------------

def test_plan_fills_an_h100_with_two_images():
    counts = arch.norm_shapes("resnet50")
    assert len(counts) == 12 and sum(counts.values()) == 53
    shapes = list(counts)
    for c, h, w in shapes:
        p = plan.plan(2, c, h * w, 32, 132)
        most = 2 * (c // p.block_c) * h * w  # one row per program: 392 for 512 x 7 x 7
        assert p.reduce_programs(2, c) >= min(4 * 132, most), (c, h, w, p)
        assert p.apply_programs(2, c, h * w) >= min(4 * 132, most), (c, h, w, p)
        assert p.chunks > 1  # N * C/128 < 4 * 132 for every layer at N = 2: always split
        assert plan.plan(32, c, h * w, 32, 132).reduce_programs(32, c) >= 4 * 132
        big = plan.plan(256, c, h * w, 32, 132)  # 256 images fill the GPU with little or no split
        assert big.chunks <= 4


# --- launch-plan tuning (IMNET_GN_TUNE) --------------------------------------------------------

TUNINGS = ["tile=512,block_c=16,warps=2", "programs_per_sm=8,tile=1024,align_rows=1", "tile=8192,warps=8,block_c=256"]


@pytest.mark.parametrize("text", TUNINGS)
def test_other_tunings_compute_the_same_function(tuned, text):
    tuned(text)
    t = plan.tuning()
    p = plan.plan(2, 64, 7 * 7, 32, 4)
    assert p.block_c == min(64, t.block_c) and p.block_hw * p.block_c <= t.tile
    assert p.num_warps == (t.warps or p.num_warps)
    if t.align_rows:  # whole tiles in every chunk but the last
        assert all(plan.plan(2, c, h * w, 32, 132).rows % plan.plan(2, c, h * w, 32, 132).block_hw == 0
                   for c, h, w in arch.norm_shapes("resnet50"))
    _check(2, 64, 7, 7, 32, torch.bfloat16, act=Act.RELU, residual=True)
    _check(2, 256, 3, 3, 32, torch.float32, act=Act.RELU)
    _check(1, 32, 5, 4, 8, torch.float16, rows_per_chunk=3)


def test_set_tuning_replans_and_forgets_cached_launches(tuned):
    x = _data(2, 256, 4, 4, torch.float32, 0)[0]
    ops.group_norm(x, 32)
    default = plan.plan(2, 256, 56 * 56, 32, 132)
    assert ops.cached()
    tuned("block_c=32,programs_per_sm=8")
    assert str(plan.tuning()) == "block_c=32,programs_per_sm=8"
    p = plan.plan(2, 256, 56 * 56, 32, 132)
    assert (default.block_c, p.block_c) == (128, 32) and p.reduce_programs(2, 256) >= 8 * 132
    assert not ops.cached()
    _check(2, 256, 4, 4, 32, torch.float32)  # the new plan's kernels, not the old ones' constexprs


# --- local kernels (IMNET_GN_TUNE=local=...): statistics and apply in one program -----------------

# Every channel count per program: 16 lanes of 8 groups of 2 channels over several tiles, 12 of 16
# lanes for groups of 6, a block wider than C (6 channels in 8 lanes); 64 lanes of one group (cpg 64),
# of 8 groups of 8, of 2 groups of 32.
SMALL_TILES = "local=16,programs_per_sm=1,tile=64,block_c=16"
LOCAL_CASES = [(SMALL_TILES, (2, 64, 5, 5, 32)), (SMALL_TILES, (1, 24, 3, 5, 4)), (SMALL_TILES, (1, 6, 5, 3, 3)),
               ("local=64,programs_per_sm=1", (1, 256, 2, 2, 4)), ("local=64,programs_per_sm=1", (2, 256, 4, 4, 32)),
               ("local=64,programs_per_sm=1", (2, 64, 4, 4, 2)), ("local=64,programs_per_sm=1", (2, 48, 5, 5, 8)),
               ("local=16,programs_per_sm=1", (2, 64, 3, 5, 16))]


@pytest.mark.parametrize("text, shape", LOCAL_CASES, ids=str)
def test_local_kernels_compute_the_same_function(tuned, text, shape):
    """SMALL_TILES: 4 rows per tile at 16 lanes, so both sweeps walk several tiles (5x5: 7, the last
    holding 1 row). The others fit one tile (ONE: x and dy kept in registers), the last two with rows
    (25 of 32, 15 of 16) and lanes (48 of 64) left empty."""
    tuned(text)
    n, c, h, w, groups = shape
    p = plan.plan(n, c, h * w, groups, 1)
    cpg = c // groups
    assert p.local and p.chunks == 1 and p.channels % cpg == 0 and p.channels <= p.block_c
    assert p.one == (p.block_hw >= h * w) == (text != SMALL_TILES)
    for act, residual in ((Act.NONE, False), (Act.RELU, False), (Act.RELU, True)):
        _check(*shape, torch.float32, act, residual)
    _check(*shape, torch.bfloat16, Act.RELU, True)
    x = _data(n, c, h, w, torch.float32, 1)[0]
    _, stats, launches = ops.forward(x, torch.ones(c), torch.zeros(c), groups, 1e-5, Act.NONE)
    mean, rstd = ops.mean_rstd(stats, launches.moff, n, groups)
    var, mu = torch.var_mean(x.double().reshape(n, groups, -1), dim=-1, unbiased=False)
    torch.testing.assert_close(mean.double(), mu, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), atol=1e-6, rtol=1e-5)


def test_local_plan_only_where_its_programs_fill_the_gpu(tuned):
    """local=16 on an H100 (132 SMs, 4 x 132 programs wanted): every ResNet-50 layer at 256 images,
    the layers of 512 or more channels at 32 (32 x 512/16 = 1024 programs; 256 channels: 512), none
    at 2 images (the split plan). Never with a group wider than 64 channels, nor with a forced split."""
    tuned("local=16")
    for c, h, w in arch.norm_shapes("resnet50"):
        for n in (256, 32, 2):
            p = plan.plan(n, c, h * w, 32, 132)
            assert p.local == (n == 256 or (n == 32 and c >= 512)), (n, c, h, w)
            assert p.reduce_programs(n, c) >= 4 * 132 or n == 2
            if p.local:
                assert p.channels == max(16, c // 32) and p.reduce_programs(n, c) == p.apply_programs(n, c, h * w)
    assert not plan.plan(256, 256, 49, 2, 132).local          # 128 channels per group
    assert plan.plan(256, 256, 49, 4, 132).local              # 64
    assert not plan.plan(256, 256, 49, 32, 132, 7).local      # rows_per_chunk


def test_local_programs_keep_a_whole_sample_where_one_tile_holds_it(tuned):
    """ONE where npow2(HW) rows x the lanes (16, or the group's 32 and 64 channels at C = 1024, 2048)
    fit the tile: at 256 images the 7x7 layers and those of 14x14 up to 512 channels with the default
    tile; with tile=16384 also 1024x14x14 and the 28x28 ones (16 warps). 56x56 and the stem walk tiles."""
    for text, whole in (("local=16", lambda c, hw: hw == 49 or (hw == 196 and c <= 512)),
                        ("local=16,tile=16384", lambda c, hw: hw in (49, 196, 784))):
        tuned(text)
        for c, h, w in arch.norm_shapes("resnet50"):
            fwd = plan.forward(256, c, h * w, 32, 1e-5, Act.RELU, 132)
            bwd = plan.backward(256, c, h * w, 32, Act.RELU, 132, None, True, True)
            assert [s.name for s in fwd.steps + bwd.steps] == ["_fwd_local", "_bwd_local", "_bwd_combine"]
            assert fwd.steps[0].constexprs["ONE"] == bwd.steps[0].constexprs["ONE"] == whole(c, h * w), (c, h, w)
    assert plan.forward(256, 512, 784, 32, 1e-5, Act.NONE, 132).steps[0].num_warps == 16


def test_each_mode_gets_its_own_kernels_whatever_the_environment():
    """Under TRITON_INTERPRET=1 (this file's fixture), asking for the compiled kernels gives compiled
    ones, and the environment is left as it was."""
    from triton.runtime.interpreter import InterpretedFunction

    assert not any(isinstance(f, InterpretedFunction) for f in launch.jit(False).values())
    assert all(isinstance(f, InterpretedFunction) for f in launch.jit(True).values())
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_without_the_fast_path_the_kernels_sum_with_their_own_combine(monkeypatch):
    """launch.FAST_PATH_PROBLEM set (a Triton whose internals moved): one warning, then kernels whose
    sums use kernels.add instead of Triton's own combine function, with the same results."""
    monkeypatch.setattr(launch, "FAST_PATH_PROBLEM", "a stand-in problem")
    monkeypatch.setattr(launch, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"Triton \S+ is not what the kernels' fast launch path expects "
                                            r"\(a stand-in problem\)"):
        assert launch.kernels_interpreted()
    own = launch.jit(True, True)["_fwd_stats"].fn.__globals__["sum_combine"]
    assert own.fn.__name__ == "add"
    assert launch.jit(True, False)["_fwd_stats"].fn.__globals__["sum_combine"].fn.__name__ == "_sum_combine"
    errs = _check(2, 64, 7, 7, 32, torch.float32, act=Act.RELU, residual=True, rows_per_chunk=16)
    assert max(errs.values()) <= OUT_BOUND[torch.float32]


@pytest.mark.parametrize("text, message", [
    ("tile=3000", "tile=3000 must be a power of 2"),
    ("foo=1", "'foo=1' is not knob=value"),
    ("tile", "'tile' is not knob=value"),
    ("warps=3", "warps=3 must be a power of 2"),
    ("programs_per_sm=0", "programs_per_sm=0 must be in"),
    ("align_rows=2", "align_rows=2 must be a power of 2 in \\[0, 1\\]"),
    ("programs_per_sm=two", "programs_per_sm='two' is not an integer"),
    ("block_c=256,tile=128", "block_c=256 is larger than tile=128"),
    ("local=12", "local=12 must be a power of 2 in \\[0, 64\\]"),
    ("local=128", "local=128 must be a power of 2 in \\[0, 64\\]"),
])
def test_bad_tuning_strings_name_the_problem(text, message):
    with pytest.raises(ValueError, match=f"IMNET_GN_TUNE: {message}"):
        plan.parse_tuning(text)


def test_tuning_strings_round_trip_and_the_environment_sets_them():
    assert str(plan.Tuning()) == "" and plan.parse_tuning("") == plan.parse_tuning(" , ") == plan.Tuning()
    t = plan.parse_tuning(" warps=8 , programs_per_sm=3")
    assert t == plan.Tuning(warps=8, programs_per_sm=3) and plan.parse_tuning(str(t)) == t
    code = "from imnet.kernels.gn import plan; print(plan.tuning())"
    env = {**os.environ, "IMNET_GN_TUNE": "tile=2048,programs_per_sm=2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tile=2048,programs_per_sm=2"
    env["IMNET_GN_TUNE"] = "tiles=2048"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "IMNET_GN_TUNE: 'tiles=2048' is not knob=value" in bad.stderr


# --- registry, config, models ----------------------------------------------------------------

def test_make_returns_the_module_with_the_native_state_dict():
    m = norm.make("gn", 64, groups=32, impl="triton")
    assert type(m) is ChannelsLastGroupNorm and m.num_groups == 32 and m.act is Act.NONE and norm.is_norm(m)
    assert type(norm.make("gn", 64, impl="auto")) is ChannelsLastGroupNorm  # Triton imports here
    assert type(norm.make("ln", 64, impl="triton")) is ChannelsLastGroupNorm
    assert type(norm.make("gn", 64)) is nn.GroupNorm and type(norm.make("gn", 64, impl="native")) is nn.GroupNorm
    assert m.state_dict().keys() == nn.GroupNorm(32, 64).state_dict().keys()
    m.load_state_dict(nn.GroupNorm(32, 64).state_dict(), strict=True)
    assert config.ModelCfg().gn_impl == "auto"
    with pytest.raises(config.ConfigError, match="model.gn_impl"):
        config.load(None, ["model.gn_impl=cuda"])


def _fused_norms(model):
    return [m for m in model.modules() if isinstance(m, ChannelsLastGroupNorm) and m.act == Act.RELU]


def test_resnet50_fuses_norm_relu_and_keeps_checkpoints_loadable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # whole models: the CPU reference path
    cfg = config.load(None, ["model.arch=resnet50", "model.gn_impl=triton", "model.gn_groups=8"])
    info = type("Info", (), {"num_classes": 7, "in_channels": 3, "image_size": 16})
    torch.manual_seed(0)
    fused = models.from_config(cfg.model, info)
    blocks = [m for m in fused.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(b.fused for b in blocks)
    # stem + (bn1, bn2, bn3) of each block fuse; the 4 downsample norms do not
    assert len(_fused_norms(fused)) == 1 + 3 * 16 and isinstance(fused.relu, nn.Identity)
    torch.manual_seed(0)
    native = models.build("resnet50", num_classes=7, image_size=16, norm="gn", norm_kwargs={"groups": 8})
    assert not any(getattr(b, "fused", False) for b in native.modules())
    assert fused.state_dict().keys() == native.state_dict().keys()
    fused.load_state_dict(native.state_dict(), strict=True)
    bn = models.build("resnet50", num_classes=7, image_size=16, norm="bn")
    assert not any(getattr(b, "fused", False) for b in bn.modules()) and isinstance(bn.relu, nn.ReLU)


def test_resnet50_gn_impl_triton_trains_a_step_like_native(monkeypatch):
    """On the CPU the fused model computes exactly what the native one does (reference path)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    torch.manual_seed(0)
    native = models.build("resnet50", num_classes=7, image_size=16, norm="gn", norm_kwargs={"groups": 8})
    with torch.no_grad():  # non-trivial gammas: zero-init would hide the last norm of each block
        for m in native.modules():
            if norm.is_norm(m):
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
    fused = models.build("resnet50", num_classes=7, image_size=16, norm="gn",
                         norm_kwargs={"groups": 8, "impl": "triton"})
    fused.load_state_dict(native.state_dict())
    x = _cl(torch.randn(2, 3, 16, 16))
    labels = torch.tensor([1, 4])
    losses = []
    for model in (native, fused):
        model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for a, b in zip(native.parameters(), fused.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", [True, False])
def test_fused_bottleneck_runs_the_kernels_like_the_unfused_block(residual):
    """One ResNet-50 bottleneck (64 -> 16 -> 64 channels, 4x4) through the interpreter's kernels."""
    torch.manual_seed(0)
    make = functools.partial(ChannelsLastGroupNorm, 8)
    block = Bottleneck(64, 16, norm_layer=make)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1, 0.5)
                m.bias.normal_(0, 0.5)
    ref = Bottleneck(64, 16, norm_layer=functools.partial(nn.GroupNorm, 8))
    ref.load_state_dict(block.state_dict())
    fuse_norm_act(block, residual=residual)
    assert block.fused and block.bn1.act == block.bn2.act == Act.RELU
    assert block.bn3.act == (Act.RELU if residual else Act.NONE)
    block.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    x = _cl(torch.randn(2, 64, 4, 4) * 2 + 1)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [block(xs[0]), ref(xs[1])]
    torch.testing.assert_close(ys[0], ys[1], atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(ys[0])
    g0 = torch.autograd.grad(ys[0], [xs[0], *block.parameters()], dy)
    g1 = torch.autograd.grad(ys[1], [xs[1], *ref.parameters()], dy)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class _Blocks(nn.Module):
    """conv -> GN + ReLU -> conv -> relu(GN + identity) -> GN without affine parameters -> head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.gn1 = ChannelsLastGroupNorm(8, 32, act=Act.RELU)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.gn2 = ChannelsLastGroupNorm(8, 32, act=Act.RELU)
        self.gn3 = ChannelsLastGroupNorm(4, 32, affine=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        a = self.gn1(self.conv1(x))
        b = self.gn2(self.conv2(a), a)
        return self.head(self.gn3(b).mean((2, 3)))


def _loss_and_grads(model, fn, x):
    for p in model.parameters():
        p.grad = None
    out = fn(x)
    out.square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def test_torch_compile_traces_the_norms_without_graph_breaks(monkeypatch, tmp_path):
    """Under torch.compile the norms are the custom ops imnet::group_norm_fwd/_bwd (the same kernels),
    not a graph break per norm: one graph, with the ops in it. With aot_eager (autograd traced, the
    ops run as they are) the loss and every gradient equal eager's exactly; with Inductor (which
    also fuses the convs' neighbours) to float rounding. Inductor compiles into a fresh cache: its
    on-disk cache does not key on a custom op's fake implementation, so code compiled against an
    earlier version of the ops would be reused."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    model = _Blocks().to(memory_format=torch.channels_last)
    x = _cl(torch.randn(2, 3, 8, 8))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert "imnet.group_norm_fwd" in explained.graphs[0].code
    eager = _loss_and_grads(model, model, x)
    for backend, tol in (("aot_eager", 0.0), ("inductor", 1e-5)):
        torch._dynamo.reset()
        got = _loss_and_grads(model, torch.compile(model, backend=backend), x)
        for a, b in zip(got, eager):
            assert (a - b).abs().max().item() <= tol * b.abs().max().item(), backend


@pytest.mark.parametrize("act, residual", [(Act.NONE, False), (Act.RELU, False), (Act.RESIDUAL_RELU, True)])
def test_custom_ops_pass_opcheck(act, residual):
    """torch.library.opcheck: the ops' schemas, fake (meta) implementations, autograd registration and
    aliasing rules, as torch.compile relies on them."""
    x, weight, bias, dy, r = _data(2, 16, 5, 5, torch.float32, 3, residual)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
            r.requires_grad_() if residual else None, 4, 1e-5, int(act), None)
    torch.library.opcheck(torch.ops.imnet.group_norm_fwd, args)
    y, moments = torch.ops.imnet.group_norm_fwd(*args)
    for need_dx, need_dparams in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(torch.ops.imnet.group_norm_bwd,
                              (dy, x.detach(), y.detach(), weight.detach(), bias.detach(), moments.detach(), 4,
                               int(act), None, need_dx, need_dparams))
