"""The PyTorch GroupNorm that the Triton kernels compute, with the same fused epilogues.

    y = group_norm(x)                          act=Act.NONE
    y = relu(group_norm(x))                    act=Act.RELU
    y = relu(group_norm(x) + residual)         act=Act.RELU, residual given (the end of a ResNet block)

It is the fallback of ChannelsLastGroupNorm (CPU tensors, CUDA tensors that are not channels-last,
no Triton) and the unfused reference of the tests. It is native `F.group_norm` plus separate
elementwise ops, so its numbers and speed are exactly those of nn.GroupNorm followed by the add and
ReLU a block would otherwise do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imnet.kernels.common import Act, check_act


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, act: Act = Act.NONE,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """relu?(F.group_norm(x) (+ residual)), in whatever dtype / layout F.group_norm gives."""
    check_act(act, residual)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    if act == Act.RELU:
        # In place, as nn.ReLU(inplace=True) in a ResNet block: group_norm's backward does not
        # need its output, and `y + residual` is a fresh tensor.
        y = torch.relu_(y)
    return y


def random_inputs(n: int, c: int, h: int, w: int, dtype: torch.dtype, generator: torch.Generator,
                  residual: bool = False):
    """(x, weight, bias, dy, residual or None) for checking a GroupNorm against this reference, on
    the generator's device: x = 3*randn + 5 (a non-zero mean and non-unit scale catch an unstable
    variance; never zeros, which hide unwritten outputs), gamma = 0.5*randn + 1, beta, dy and the
    residual randn; activations channels-last in `dtype`, parameters float32."""
    dev = generator.device

    def act(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous(memory_format=torch.channels_last)

    x = act(3 * torch.randn(n, c, h, w, device=dev, generator=generator) + 5)
    weight = torch.randn(c, device=dev, generator=generator) * 0.5 + 1
    bias = torch.randn(c, device=dev, generator=generator)
    dy = act(torch.randn(n, c, h, w, device=dev, generator=generator))
    r = act(torch.randn(n, c, h, w, device=dev, generator=generator)) if residual else None
    return x, weight, bias, dy, r


def relu_ties(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float,
              residual: torch.Tensor | None = None, rel_tol: float = 1e-5) -> torch.Tensor:
    """Where ReLU's gradient is decided by rounding: |v| <= rel_tol * max|v| for the pre-activation
    v = group_norm(x) (+ residual), computed in float64. A kernel computes v in float32 (error about
    1e-7 * max|v|), so at these elements relu'(v) may come out 0 or 1 and both are right; with
    millions of elements some always fall there (seen on an H100 at 32 images: a few elements per
    layer flipped, nowhere else an error). Checks set dy to 0 there, so the mask does not matter."""
    v = F.group_norm(x.double(), num_groups, weight.double(), bias.double(), eps)
    if residual is not None:
        v = v + residual.double()
    return v.abs() <= rel_tol * v.abs().max()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|."""
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def errors_vs_float64(y: torch.Tensor, grads, ins, dy: torch.Tensor, num_groups: int, eps: float,
                      act: Act) -> dict[str, float]:
    """Relative errors of an output y = relu?(group_norm(x) (+ residual)) and its gradients, computed
    from ins = [x, weight, bias(, residual)], against this reference in float64 on the same inputs.
    Keys: y, dx, dgamma, dbeta (and dresidual)."""
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    y64 = group_norm(ref_ins[0], num_groups, ref_ins[1], ref_ins[2], eps, act=act,
                     residual=ref_ins[3] if len(ref_ins) > 3 else None)
    grads64 = torch.autograd.grad(y64, ref_ins, dy.double())
    errs = {"y": relative_error(y, y64)}
    for name, g, g64 in zip(("dx", "dgamma", "dbeta", "dresidual"), grads, grads64):
        errs[name] = relative_error(g, g64)
    return errs
