"""Norm registry: every normalization layer in imnet is created here, by name, channels first.

    make("bn", 256)                          BatchNorm2d
    make("syncbn", 256)                      SyncBatchNorm2d: global batch statistics across ranks
    make("gn", 256, groups=32)               GroupNorm, 32 groups (Wu & He 2018 default)
    make("gn", 256, channels_per_group=16)   GroupNorm, 16 groups of 16 channels
    make("ln", 256)                          GroupNorm with one group (the GN paper's LN for conv nets)
    make("in", 256)                          GroupNorm with one channel per group (its IN)
    make("none", 256)                        Identity
    make("gn", 256, impl="auto")             the channels-last Triton GroupNorm where Triton imports

Every keyword is accepted for every name (those that do not apply are ignored) so a config can
pass one `norm_kwargs` dict whatever the norm is.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from imnet import kernels
from imnet.arch import num_groups  # torch-free, for config validation; norm.num_groups to callers

NAMES = ("bn", "syncbn", "gn", "ln", "in", "none")


# ---------------------------------------------------------------------------------------------
# GroupNorm family: one seam that picks the implementation.
# ---------------------------------------------------------------------------------------------

def _native_group_norm(groups: int, channels: int, eps: float) -> nn.Module:
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


def _triton_group_norm(groups: int, channels: int, eps: float) -> nn.Module:
    """The channels-last Triton GroupNorm (imnet.kernels), on every CUDA GPU (any_gpu); it runs native
    GroupNorm math on the CPU."""
    if not kernels.triton_available():
        raise RuntimeError("norm impl 'triton' needs Triton, which does not import here; "
                           "install it or use impl 'auto' (model.gn_impl=auto) to fall back to native")
    return kernels.ChannelsLastGroupNorm(groups, channels, eps=eps, any_gpu=True)


def _auto_group_norm(groups: int, channels: int, eps: float) -> nn.Module:
    """triton where Triton imports (its module still takes the native path for CPU tensors and on
    GPUs Triton does not support), else native. The device is not known here; ChannelsLastGroupNorm
    decides per input in forward."""
    if kernels.triton_available():
        return kernels.ChannelsLastGroupNorm(groups, channels, eps=eps)
    return _native_group_norm(groups, channels, eps)


# impl name -> factory(groups, channels, eps). Every implementation subclasses nn.GroupNorm (same
# parameters, same state dict) so that is_norm() and checkpoints keep working.
_GROUP_NORM_IMPLS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "native": _native_group_norm,
    "triton": _triton_group_norm,
    "auto": _auto_group_norm,
}


def _check_impl(impl: str) -> None:
    if impl not in _GROUP_NORM_IMPLS:
        raise ValueError(f"unknown norm impl {impl!r}; valid: {', '.join(_GROUP_NORM_IMPLS)}")


def _group_norm(groups: int, channels: int, eps: float, impl: str) -> nn.Module:
    """The seam: gn, ln and in all come through here."""
    _check_impl(impl)
    return _GROUP_NORM_IMPLS[impl](groups, channels, eps)


# ---------------------------------------------------------------------------------------------
# SyncBatchNorm that also works on CPU (gloo).
# ---------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: out = sum_r x_r on every rank, so dL/dx_r = sum_r dL_r/dout.

    torch.distributed.nn.functional.all_reduce does the same but is deprecated in torch 2.14, and
    the autograd-aware functional-collectives all_reduce does not exist in older torch (>= 2.3 is
    supported); this is ten lines and works with gloo.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class SyncBatchNorm2d(_BatchNorm):
    """BatchNorm2d whose training statistics are those of the global batch across a process group.

    Exactly BatchNorm2d (same code path) in eval mode, without torch.distributed, or when the group
    has one rank. With world > 1 in training: CUDA tensors go through torch's own SyncBatchNorm
    kernel; CPU tensors (gloo) through `_sync_cpu`, which torch lacks.

    It subclasses _BatchNorm, not nn.SyncBatchNorm, on purpose: DistributedDataParallel refuses to
    wrap a CPU module containing an nn.SyncBatchNorm ("SyncBatchNorm layers only work with GPU
    modules"), which would make CPU + gloo training impossible.

    Backward contract (same as torch's SyncBatchNorm): in a training step every rank must run the
    forward AND the backward through every sync layer, because backward all-reduces too.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group  # None: the default (world) group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects 4-D NCHW input, got {input.dim()}-D input "
                             f"of shape {tuple(input.shape)}")

    def _sync_world(self) -> int:
        """Ranks to synchronize with; 1 means behave as plain BatchNorm2d."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        world = self._sync_world()
        if world == 1:
            return super().forward(input)  # _BatchNorm.forward: the exact BatchNorm2d code path

        # Same momentum bookkeeping as _BatchNorm.forward (momentum None = cumulative average).
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        group = dist.group.WORLD if self.process_group is None else self.process_group
        if input.device.type == "cpu":
            return self._sync_cpu(input, factor, group)
        # GPU: torch's kernel (all-gathers per-rank mean/invstd/count, same math as below).
        from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBN
        return _TorchSyncBN.apply(input, self.weight, self.bias, self.running_mean,
                                  self.running_var, self.eps, factor, group, world)

    def _sync_cpu(self, x: torch.Tensor, factor: float, group) -> torch.Tensor:
        C = x.shape[1]
        # Statistics in at least float32 even for half inputs (bf16 sums lose the mean).
        xs = x.to(torch.promote_types(x.dtype, torch.float32))
        n_local = x.numel() // C  # values per channel on this rank

        # Local count, mean and M2 (sum of squared deviations from the LOCAL mean). var_mean is a
        # stable two-pass/Welford reduction, unlike E[x^2] - E[x]^2 which cancels catastrophically
        # when |mean| >> std.
        if n_local > 0:
            var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
            m2 = var * n_local
        else:  # an empty local batch contributes nothing, but stays in the graph
            mean = m2 = xs.sum(dim=(0, 2, 3))
        row = torch.cat([mean.new_full((1,), float(n_local)), mean, m2])

        # Gather every rank's row: write ours into a zero table and SUM-all-reduce it. One
        # collective, differentiable (backward all-reduces the gradient), and gloo has it
        # (the autograd all_gather's backward would need reduce_scatter / all_to_all).
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        table = row.new_zeros(world, row.numel())
        table[rank] = row
        table = _AllReduceSum.apply(table, group)
        counts, means, m2s = table[:, :1], table[:, 1:C + 1], table[:, C + 1:]

        n = counts.sum()
        n_total = int(n.item())  # integer counts: exact in float32 up to 2**24 values per channel
        if n_total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n_total} "
                             f"across {world} ranks")
        # Chan et al.'s parallel combination: global mean, and the global M2 as the sum of the
        # local M2s plus each rank's between-group term n_r * (mean_r - mean)^2.
        g_mean = (counts * means).sum(0) / n
        g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
        g_var = g_m2 / n  # biased: what BN normalizes with

        if self.track_running_stats:
            with torch.no_grad():  # exactly BN's update, with the unbiased variance N/(N-1)
                self.running_mean.mul_(1 - factor).add_(g_mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = g_m2 / (n - 1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

        scale = torch.rsqrt(g_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = (xs - g_mean.view(1, C, 1, 1)) * scale.view(1, C, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, C, 1, 1)
        return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------

# Everything make() can return except Identity; the normalization base classes are used (not just
# the exact classes) so split_params also recognizes torch norms built outside this module.
_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def make(name: str, channels: int, *, groups: int | None = 32, channels_per_group: int | None = None,
         eps: float = 1e-5, momentum: float | None = 0.1, impl: str = "native") -> nn.Module:
    """A norm layer for `channels` channels of NCHW input.

    groups / channels_per_group: gn only. momentum: bn / syncbn only. impl: the GroupNorm
    implementation for gn / ln / in (validated for every name so a typo fails early).
    """
    _check_impl(impl)
    if name == "bn":
        return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
    if name == "syncbn":
        return SyncBatchNorm2d(channels, eps=eps, momentum=momentum)
    if name == "gn":
        return _group_norm(num_groups(channels, groups, channels_per_group), channels, eps, impl)
    if name == "ln":
        return _group_norm(1, channels, eps, impl)
    if name == "in":
        return _group_norm(channels, channels, eps, impl)
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {name!r}; valid: {', '.join(NAMES)}")


def is_norm(module: nn.Module) -> bool:
    """True for every module make() returns except the Identity of "none"."""
    return isinstance(module, _NORM_TYPES)


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(norm parameters, all other parameters), each parameter exactly once, in model order.

    For per-group weight decay: whether norm gamma/beta decay is a config choice. Parameters
    that do not require grad are included too; the optimizer decides what to do with them.
    """
    norm_ids = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    norm, other = [], []
    for p in model.parameters():  # deduplicates shared (tied) parameters
        (norm if id(p) in norm_ids else other).append(p)
    return norm, other
