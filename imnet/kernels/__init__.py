"""Channels-last GroupNorm: the module the norm registry returns for model.gn_impl = auto | triton.

    ChannelsLastGroupNorm(32, 256)                 GroupNorm (same parameters, same state dict)
    ChannelsLastGroupNorm(32, 256, act="relu")     relu(GroupNorm(x)); forward(x, residual) gives
                                                   relu(GroupNorm(x) + residual): a block's end

Where its forward runs:
  - the Triton kernels (imnet/kernels/group_norm.py, imported on first use) for a CUDA tensor that
    is 4-D, channels-last and float32/bf16/fp16, when Triton imports; also for such a CPU tensor
    when TRITON_INTERPRET=1 (Triton's CPU interpreter: how the CPU tests run the real kernels);
    in both cases only for samples (C x H x W) of at most 2**31 - 1 elements (32-bit offsets);
  - otherwise the PyTorch reference (imnet/kernels/reference.py: F.group_norm, then the add and ReLU),
    the same math. A CUDA input that is not channels-last takes this path rather than being copied
    into channels-last and back: native GroupNorm handles contiguous NCHW well, and the copies
    would cost more than the norm. Models here run channels-last (model.channels_last=true).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from imnet.kernels import reference

__all__ = ["ChannelsLastGroupNorm", "kernel_applies", "triton_available"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_triton_imports: bool | None = None   # (module globals, not functools caches: torch.compile traces these)


def triton_available() -> bool:
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_imports = True
        except Exception:  # ImportError, or a broken install that fails while importing
            _triton_imports = False
    return _triton_imports


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


MAX_SAMPLE_ELEMENTS = 2**31 - 1   # the kernels index within a sample with 32-bit integers


def kernel_applies(x: torch.Tensor) -> bool:
    """True when ChannelsLastGroupNorm would run the Triton kernels on x (see the module docstring)."""
    if x.dim() != 4 or x.dtype not in _DTYPES or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if x.shape[1] * x.shape[2] * x.shape[3] > MAX_SAMPLE_ELEMENTS:
        return False
    if x.is_cuda:
        return triton_available()
    return x.device.type == "cpu" and _interpret() and triton_available()


_group_norm_checked = None


def _kernel():
    """group_norm_checked, imported on first use (an import statement in forward costs each call)."""
    global _group_norm_checked
    if _group_norm_checked is None:
        from imnet.kernels.group_norm import group_norm_checked
        _group_norm_checked = group_norm_checked
    return _group_norm_checked


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the channels-last Triton kernels and optional fused ReLU / residual + ReLU.

    A subclass of nn.GroupNorm: same parameters and state-dict keys, so checkpoints load into either
    and imnet.norm.is_norm / split_params see it. `act` is a plain attribute; the ResNets set it to
    "relu" where a norm is followed by a ReLU (imnet.models.resnet.fuse_norm_act).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: str | None = None, device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        reference.check_act(act, None)
        self.act = act

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if kernel_applies(x):
            return _kernel()(x, self.num_groups, self.weight, self.bias, self.eps, self.act, residual)
        return reference.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.act, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act}" if self.act else "")
