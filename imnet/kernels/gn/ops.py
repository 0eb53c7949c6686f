"""The GroupNorm kernels as PyTorch operations: the forward and backward drivers (allocate, plan,
launch), the autograd Function for eager mode, and the custom ops imnet::group_norm_fwd /
imnet::group_norm_bwd that torch.compile sees instead (the same drivers, opaque to the compiler, so a
compiled model keeps its norms in one graph).

A norm call's launches follow from its cache key: everything Triton's JIT specializes on (the dtype
and 16-byte alignment of each tensor passed in, where freshly allocated ones are always aligned;
the device, and with it the SM count of the plan; the shapes and options, from which every integer
and float argument follows; which kernels run). So the plan is made once per key, and after its
first run the compiled kernels are started directly (launch.Replay).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from imnet.kernels.common import DTYPES, Act, check_act, epilogue
from imnet.kernels.gn import launch, plan

_calls: dict = {}   # cache key -> [plan.Launches, compiled kernels or None]


def cached() -> list[bool]:
    """One entry per norm call planned so far: whether its compiled kernels are kept for replay."""
    return [entry[1] is not None for entry in _calls.values()]


def forget() -> None:
    """Drop every planned call and its compiled kernels (set_tuning does, as the keys hold no tuning)."""
    _calls.clear()


plan.on_set_tuning(forget)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: fewest programs is fastest


def _spec(t) -> tuple | None:
    """What Triton's JIT specializes a tensor argument on."""
    return None if t is None else (t.dtype, t.data_ptr() % 16 == 0)


def call_key(x, weight, bias, other, groups: int, act: Act, rows_per_chunk) -> tuple:
    """The part of a forward's and its backward's cache keys they share; `other`: the residual (the
    forward) or the output y that the residual epilogue's backward reads."""
    return (x.shape, x.device, _spec(x), _spec(weight), _spec(bias), _spec(other), groups, act, rows_per_chunk)


def forward(x, weight, bias, groups: int, eps: float, act: Act, residual=None, rows_per_chunk=None, base=None):
    """(y, the float32 statistics buffer (2, plane), the call's plan.Launches). act: the epilogue
    (RESIDUAL_RELU with `residual`); base: call_key(x, weight, bias, residual, ...) if known. mean_rstd()
    reads the buffer. One allocation for the partials and the per-group values instead of three (each
    about as costly as a launch on the host)."""
    if base is None:
        base = call_key(x, weight, bias, residual, groups, act, rows_per_chunk)
    key = ("fwd", base, eps)
    entry = _calls.get(key)
    if entry is None:
        N, C, H, W = x.shape
        entry = _calls[key] = [plan.forward(N, C, H * W, groups, eps, act, sm_count(x.device), rows_per_chunk), None]
    stats = torch.empty((2, entry[0].plane), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x, memory_format=torch.channels_last)
    launch.issue(entry, x, {"x": x, "y": y, "residual": residual, "stats": stats, "weight": weight, "bias": bias})
    return y, stats, entry[0]


def mean_rstd(stats: torch.Tensor, moff: int, n: int, groups: int) -> torch.Tensor:
    """The float32 mean (row 0) and rstd (row 1), (2, N, G), in the statistics buffer of a forward
    whose plan.Launches has `moff` (a view)."""
    return stats[:, moff:moff + n * groups].view(2, n, groups)


def backward(dy, x, y, weight, bias, stats, groups: int, act: Act, rows_per_chunk, need_dx: bool,
             need_dparams: bool, base: tuple):
    """(dx, dgamma, dbeta, d residual), None for those not asked for (d residual: RESIDUAL_RELU only).
    y: the forward's output (read for the mask of RESIDUAL_RELU only); stats: its statistics buffer;
    base: the forward's call_key."""
    residual = act == Act.RESIDUAL_RELU
    key = ("bwd", base, _spec(dy), need_dx, need_dparams)
    entry = _calls.get(key)
    if entry is None:
        N, C, H, W = x.shape
        entry = _calls[key] = [plan.backward(N, C, H * W, groups, act, sm_count(x.device), rows_per_chunk, need_dx,
                                             need_dparams), None]
    part = torch.empty_like(stats)   # row 0 sum(dy) partials then c1, row 1 sum(dy*xhat) then c2
    dr = torch.empty_like(x, memory_format=torch.channels_last) if residual else None
    dgamma = torch.empty_like(weight) if need_dparams else None
    dbeta = torch.empty_like(bias) if need_dparams else None
    dx = torch.empty_like(x, memory_format=torch.channels_last) if need_dx else None
    launch.issue(entry, x, {"x": x, "dy": dy, "y": y, "dr": dr, "dx": dx, "stats": stats, "weight": weight,
                            "bias": bias, "part": part, "dgamma": dgamma, "dbeta": dbeta})
    return dx, dgamma, dbeta, dr


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _affine(x, weight, bias):
    """weight and bias, gamma = 1 and beta = 0 (float32) in place of a missing one."""
    C = x.shape[1]
    return (weight if weight is not None else torch.ones(C, device=x.device, dtype=torch.float32),
            bias if bias is not None else torch.zeros(C, device=x.device, dtype=torch.float32))


class GroupNormNHWC(torch.autograd.Function):
    """relu?(group_norm(x) (+ residual)) on channels-last x with the kernels.

    Saves x, the float32 statistics buffer (mean and rstd per (sample, group)), and (residual
    epilogue only) the output y.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, groups, eps, act, rows_per_chunk):
        # (Inside forward autograd records nothing: the parameters go to the kernels as they are.)
        w, b = _affine(x, weight, bias)
        code = epilogue(act, residual)
        ctx.base = call_key(x, w, b, residual, groups, code, rows_per_chunk)
        y, stats, _ = forward(x, w, b, groups, eps, code, residual, rows_per_chunk, ctx.base)
        ctx.save_for_backward(x, w, b, stats, y if residual is not None else None)
        ctx.groups, ctx.act, ctx.rows_per_chunk = groups, code, rows_per_chunk
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, stats, y = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
        if not (need_dx or need_dw or need_db or need_dr):
            return (None,) * 8
        need_dparams = (need_dw and ctx.has_weight) or (need_db and ctx.has_bias)
        dx, dw, db, dr = backward(_channels_last(dy), x, y, w, b, stats, ctx.groups, ctx.act, ctx.rows_per_chunk,
                                  need_dx, need_dparams, ctx.base)
        dw = dw if need_dw and ctx.has_weight else None   # in the parameters' dtypes already
        db = db if need_db and ctx.has_bias else None
        return dx, dw, db, dr if need_dr else None, None, None, None, None


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, act: Act = Act.NONE,
               residual: torch.Tensor | None = None, rows_per_chunk: int | None = None) -> torch.Tensor:
    """relu?(group_norm(x) (+ residual)) for a channels-last (N, C, H, W) float32/bf16/fp16 tensor.

    act: Act.NONE or Act.RELU; residual (same shape, needs Act.RELU): relu(group_norm(x) + residual).
    The output is channels-last in x's dtype. rows_per_chunk forces the spatial split (tests).
    """
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"group_norm: expected a channels-last 4-D tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    if x.dtype not in DTYPES:
        raise ValueError(f"group_norm: float32, bfloat16 or float16 input, got {x.dtype}")
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide {C} channels")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    return group_norm_checked(x, num_groups, weight, bias, eps, act, residual, rows_per_chunk)


def group_norm_checked(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, act: Act, residual: torch.Tensor | None,
                       rows_per_chunk: int | None = None) -> torch.Tensor:
    """group_norm() once x, the groups and the parameters' shapes are known to be right (the module:
    kernel_applies checked x, nn.GroupNorm the rest); checks act and the residual.

    Eager: the autograd Function GroupNormNHWC. Under torch.compile: the custom ops, so a compiled
    model has no graph break at its norms."""
    check_act(act, residual)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"group_norm: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        # A copy only if it is not already like x (autograd casts the gradient back).
        residual = _channels_last(residual.to(x.dtype))
    if not torch.compiler.is_compiling():
        return GroupNormNHWC.apply(x, weight, bias, residual, num_groups, float(eps), act, rows_per_chunk)
    w, b = _affine(x, weight, bias)
    return torch.ops.imnet.group_norm_fwd(x, w, b, residual, num_groups, float(eps), int(epilogue(act, residual)),
                                          rows_per_chunk)[0]


# torch.compile: the forward op returns y and the (2, N, G) float32 mean and rstd (copied out of the
# statistics buffer, so that the op's outputs have shapes the compiler knows without the plan); the
# backward op puts them back into a buffer laid out as forward's. act: an Act value as an int.

@torch.library.custom_op("imnet::group_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor],
            groups: int, eps: float, act: int, rows_per_chunk: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    y, stats, launches = forward(x, weight, bias, groups, eps, Act(act), residual, rows_per_chunk)
    return y, mean_rstd(stats, launches.moff, x.shape[0], groups).clone()


@_fwd_op.register_fake
def _(x, weight, bias, residual, groups, eps, act, rows_per_chunk):
    return (torch.empty_like(x, memory_format=torch.channels_last),
            x.new_empty((2, x.shape[0], groups), dtype=torch.float32))


@torch.library.custom_op("imnet::group_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            moments: torch.Tensor, groups: int, act: int, rows_per_chunk: Optional[int], need_dx: bool,
            need_dparams: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgamma, dbeta, d residual); an empty tensor for each one not asked for (need_dx,
    need_dparams; d residual only with the residual epilogue). moments: group_norm_fwd's mean, rstd."""
    N, C, H, W = x.shape
    act = Act(act)
    _, plane, moff = plan.layout(N, C, H * W, groups, sm_count(x.device), rows_per_chunk)
    stats = torch.empty((2, plane), device=x.device, dtype=torch.float32)
    mean_rstd(stats, moff, N, groups).copy_(moments)
    residual = act == Act.RESIDUAL_RELU
    base = call_key(x, weight, bias, y if residual else None, groups, act, rows_per_chunk)
    grads = backward(_channels_last(dy), x, y, weight, bias, stats, groups, act, rows_per_chunk, need_dx,
                     need_dparams, base)
    return tuple(x.new_empty(0) if t is None else t for t in grads)  # (distinct empties: no aliases)


@_bwd_op.register_fake
def _(dy, x, y, weight, bias, moments, groups, act, rows_per_chunk, need_dx, need_dparams):
    cl = torch.channels_last
    return (torch.empty_like(x, memory_format=cl) if need_dx else x.new_empty(0),
            torch.empty_like(weight) if need_dparams else x.new_empty(0),
            torch.empty_like(bias) if need_dparams else x.new_empty(0),
            torch.empty_like(x, memory_format=cl) if act == Act.RESIDUAL_RELU else x.new_empty(0))


def _fwd_op_setup(ctx, inputs, output):
    x, weight, bias, residual, groups, eps, act, rows_per_chunk = inputs
    y, moments = output
    ctx.save_for_backward(x, weight, bias, moments, y if act == Act.RESIDUAL_RELU else x)  # y: for its mask
    ctx.groups, ctx.act, ctx.rows_per_chunk = groups, act, rows_per_chunk


def _fwd_op_backward(ctx, dy, _dmoments):
    x, weight, bias, moments, y = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dr = ctx.needs_input_grad[:4]
    dx, dw, db, dr = torch.ops.imnet.group_norm_bwd(dy, x, y, weight, bias, moments, ctx.groups, ctx.act,
                                                    ctx.rows_per_chunk, need_dx, need_dw or need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            dr if need_dr else None, None, None, None, None)


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)
