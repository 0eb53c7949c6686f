"""What every part of the channels-last GroupNorm agrees on, without importing Triton: the fused
epilogue (Act), the input dtypes, the per-sample size limit and how to tell that Triton interprets."""

from __future__ import annotations

import enum
import os

import torch


class Act(enum.IntEnum):
    """The epilogue fused after the norm. The kernels receive its value as the ACT constexpr."""
    NONE = 0            # y = gn(x)
    RELU = 1            # y = relu(gn(x))
    RESIDUAL_RELU = 2   # y = relu(gn(x) + residual): the end of a ResNet block


DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # activations; statistics are float32 always
MAX_SAMPLE_ELEMENTS = 2**31 - 1   # the kernels index within a sample with 32-bit integers


def interpreting() -> bool:
    """TRITON_INTERPRET as Triton reads it: the kernels run on the CPU, in numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_act(act: Act, residual: torch.Tensor | None) -> None:
    """A module's or a call's epilogue: NONE or RELU; a residual is fused only together with RELU."""
    if act not in (Act.NONE, Act.RELU):
        raise ValueError(f"GroupNorm act must be Act.NONE or Act.RELU, got {act!r}")
    if residual is not None and act != Act.RELU:
        raise ValueError("GroupNorm residual is only fused together with ReLU: use act=Act.RELU")


def epilogue(act: Act, residual: torch.Tensor | None) -> Act:
    """The kernels' epilogue for a call with `act` and maybe a residual."""
    return Act.RESIDUAL_RELU if residual is not None else act
