"""The PyTorch GroupNorm that the Triton kernels compute, with the same fused epilogues.

    y = group_norm(x)                          act=None
    y = relu(group_norm(x))                    act="relu"
    y = relu(group_norm(x) + residual)         act="relu", residual given (the end of a ResNet block)

It is the fallback of ChannelsLastGroupNorm (CPU tensors, CUDA tensors that are not channels-last,
no Triton) and the unfused reference of the tests. It is native `F.group_norm` plus separate
elementwise ops, so its numbers and speed are exactly those of nn.GroupNorm followed by the add and
ReLU a block would otherwise do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTS = (None, "relu")


def check_act(act: str | None, residual: torch.Tensor | None) -> None:
    if act not in ACTS:
        raise ValueError(f"GroupNorm act must be one of {ACTS}, got {act!r}")
    if residual is not None and act != "relu":
        raise ValueError("GroupNorm residual is only fused together with ReLU: use act='relu'")


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, act: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu?(F.group_norm(x) (+ residual)), in whatever dtype / layout F.group_norm gives."""
    check_act(act, residual)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    if act == "relu":
        # In place, as nn.ReLU(inplace=True) in a ResNet block: group_norm's backward does not
        # need its output, and `y + residual` is a fresh tensor.
        y = torch.relu_(y)
    return y
