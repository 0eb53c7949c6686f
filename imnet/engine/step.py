"""What both engines share: the step's result, autocast, the per-step all-reduce of decisions and
metrics, the optimizer with its weight-decay groups, and the model's parameter shapes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from imnet import dist as imdist
from imnet import norm
from imnet.dtypes import amp_dtype


@dataclass
class StepOut:
    loss: float      # mean training loss over every rank's samples in this step (nan if any was non-finite)
    top1: float      # training accuracy over the same samples
    images: int      # images in this step, all ranks
    skipped: bool    # the update was skipped because a loss was non-finite on some rank
    stop: bool       # some rank asked to stop (signal): every rank stops after this step


def autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reduce_step(loss_sum: torch.Tensor, correct: torch.Tensor, n: int, stop_requested: bool) -> list[float]:
    """One all-reduce per step carries the decisions and the metrics together:
    [any non-finite loss, any stop request, loss sum, correct, images], summed over ranks."""
    dev = loss_sum.device
    flags = torch.stack([(~torch.isfinite(loss_sum)).float(), torch.tensor(float(stop_requested), device=dev),
                         torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0),
                         correct.float(), torch.tensor(float(n), device=dev)])
    return imdist.all_reduce(flags).tolist()


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: bool) -> list[dict]:
    norm_params, other = norm.split_params(model)
    if norm_weight_decay:
        return [{"params": norm_params + other, "weight_decay": weight_decay}]
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm_params, "weight_decay": 0.0}]


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.norm_weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.base_lr, betas=tuple(o.betas))
    raise RuntimeError(f"optim.name: unsupported optimizer {o.name!r}")


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """State-dict key -> shape of every parameter and buffer (ZeRO-3's real shape, not its placeholder's)."""
    out = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in module.named_buffers()})
    return out
