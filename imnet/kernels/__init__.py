"""Channels-last GroupNorm: the module the norm registry returns for model.gn_impl = auto | triton.

    ChannelsLastGroupNorm(32, 256)                 GroupNorm (same parameters, same state dict)
    ChannelsLastGroupNorm(32, 256, act=Act.RELU)   relu(GroupNorm(x)); forward(x, residual) gives
                                                   relu(GroupNorm(x) + residual): a block's end

Where its forward runs:
  - the Triton kernels (imnet/kernels/gn/, imported on first use) for a CUDA tensor that
    is 4-D, channels-last and float32/bf16/fp16, when Triton imports, on an NVIDIA GPU of compute
    capability 8.0 or newer (the GPUs Triton's README supports; the kernels are checked on an H100)
    or on any CUDA device with any_gpu=True (model.gn_impl=triton); also for such a CPU tensor
    when TRITON_INTERPRET=1 (Triton's CPU interpreter: how the CPU tests run the real kernels);
    in both cases only for samples (C x H x W) of at most 2**31 - 1 elements (32-bit offsets);
  - otherwise the PyTorch reference (imnet/kernels/reference.py: F.group_norm, then the add and ReLU),
    the same math. A CUDA input that is not channels-last takes this path rather than being copied
    into channels-last and back: native GroupNorm handles contiguous NCHW well, and the copies
    would cost more than the norm. Models here run channels-last (model.channels_last=true).
"""

from __future__ import annotations

import torch
from torch import nn

from imnet.kernels import reference
from imnet.kernels.common import DTYPES, MAX_SAMPLE_ELEMENTS, Act, check_act, interpreting

__all__ = ["Act", "ChannelsLastGroupNorm", "gpu_unsupported", "kernel_applies", "triton_available"]


_triton_imports: bool | None = None   # (module globals, not functools caches: torch.compile traces these)


def triton_available() -> bool:
    global _triton_imports
    if _triton_imports is None:
        try:
            import triton
            import triton.language  # noqa: F401
            _triton_imports = True
        except Exception:  # ImportError, or a broken install that fails while importing
            _triton_imports = False
    return _triton_imports


MIN_CAPABILITY = (8, 0)           # Triton's README: "NVIDIA GPUs (Compute Capability 8.0+)"


_unsupported: dict[int, str | None] = {}   # CUDA device index -> gpu_unsupported(it), asked once


def gpu_unsupported(device: torch.device) -> str | None:
    """Why the kernels do not run by default on the CUDA device `device` (what it is, and why), or
    None where they do: ROCm builds of torch (the kernels are checked on NVIDIA GPUs only) and NVIDIA
    GPUs below compute capability 8.0 (V100, T4, RTX 20xx), which Triton does not support."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _unsupported:
        name = torch.cuda.get_device_name(index)
        cap = tuple(torch.cuda.get_device_capability(index))
        if torch.version.hip is not None:
            _unsupported[index] = f"{name} is a ROCm GPU; imnet's GroupNorm kernels are checked on NVIDIA GPUs only"
        elif cap < MIN_CAPABILITY:
            _unsupported[index] = (f"{name} has compute capability {cap[0]}.{cap[1]}; Triton supports NVIDIA "
                                   f"GPUs of {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} and newer")
        else:
            _unsupported[index] = None
    return _unsupported[index]


def kernel_applies(x: torch.Tensor, any_gpu: bool = False) -> bool:
    """True when ChannelsLastGroupNorm would run the Triton kernels on x (see the module docstring);
    any_gpu: on every CUDA device, not only the supported ones (gpu_unsupported)."""
    if x.dim() != 4 or x.dtype not in DTYPES or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if x.shape[1] * x.shape[2] * x.shape[3] > MAX_SAMPLE_ELEMENTS:
        return False
    if x.is_cuda:
        return triton_available() and (any_gpu or gpu_unsupported(x.device) is None)
    return x.device.type == "cpu" and interpreting() and triton_available()


def gpu_note(model: nn.Module, device: torch.device) -> str | None:
    """A line for the run's log where `model` has ChannelsLastGroupNorm layers and `device` is a GPU
    on which they do not run the kernels by default (gpu_unsupported): which implementation runs."""
    if device.type != "cuda":
        return None
    layers = [m for m in model.modules() if isinstance(m, ChannelsLastGroupNorm)]
    if not layers:
        return None
    why = gpu_unsupported(device)
    if why is None:
        return None
    if any(m.any_gpu for m in layers):
        return (f"warning: model.gn_impl=triton: {why}; the Triton kernels run anyway "
                "(bench/gn_gpu_check.py checks them on this GPU)")
    return f"model.gn_impl=auto: {why}, so GroupNorm is PyTorch's (model.gn_impl=triton runs the kernels anyway)"


_group_norm_checked = None


def _kernel():
    """group_norm_checked, imported on first use (an import statement in forward costs each call)."""
    global _group_norm_checked
    if _group_norm_checked is None:
        from imnet.kernels.gn.ops import group_norm_checked
        _group_norm_checked = group_norm_checked
    return _group_norm_checked


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm with the channels-last Triton kernels and optional fused ReLU / residual + ReLU.

    A subclass of nn.GroupNorm: same parameters and state-dict keys, so checkpoints load into either
    and imnet.norm.is_norm / split_params see it. `act` is a plain attribute; the ResNets set it to
    Act.RELU where a norm is followed by a ReLU (imnet.models.resnet.fuse_norm_act). any_gpu: run the
    kernels on every CUDA GPU, also those gpu_unsupported() names (model.gn_impl=triton).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: Act = Act.NONE, any_gpu: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        check_act(act, None)
        self.act, self.any_gpu = act, any_gpu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if kernel_applies(x, self.any_gpu):
            return _kernel()(x, self.num_groups, self.weight, self.bias, self.eps, self.act, residual)
        return reference.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.act, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act.name}" if self.act else "")
