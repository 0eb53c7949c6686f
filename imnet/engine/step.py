"""What both engines share: the Engine interface, the micro-batch step with its one all-reduce of
decisions and metrics, autocast, the optimizer with its weight-decay groups, the parameter shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


class Engine(Protocol):
    """What the trainer and evaluate use of an engine (DDPEngine, DeepSpeedEngine)."""
    module: torch.nn.Module   # the bare model: evaluation, BN statistics, shapes

    def train_step(self, micro_batches: list, lr: float, stop_requested: bool = False) -> StepOut:
        """One optimizer step over the micro-batches (images, labels) of this rank, at learning rate lr."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...

    def eval_module(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """`with engine.eval_module() as m:` the model to evaluate, on every rank."""

    def save(self, ckpt, state: dict, step: int) -> None:
        """Every rank calls; the checkpoint holds the engine's state and `state`."""

    def load(self, path: str) -> dict:
        """Every rank calls: restore from checkpoint `path`; the whole saved dict."""

    def restore(self, state: dict, path: str) -> dict:
        """`load` for a checkpoint dict already read from `path`."""


def micro_batch_step(micro_batches: list, stop_requested: bool, device: torch.device, *,
                     context: Callable, forward: Callable, backward: Callable) -> StepOut:
    """The step both engines take over k micro-batches, up to the optimizer update (theirs):
    `with context(last):` logits, loss = forward(x, y), then backward(loss / k, last, skip). After the
    last forward, before its backward, one all-reduce carries the decisions and the metrics
    (reduce_step), so `skip` (a non-finite loss on some rank) is known to every rank before the last
    backward: DeepSpeed poisons it then, DDP lets it run (its reducer expects it) and drops the grads."""
    k = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    n = 0
    for i, (x, y) in enumerate(micro_batches):
        last = i == k - 1
        with context(last):
            logits, loss = forward(x, y)
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            n += y.numel()
            skip = False
            if last:
                nonfinite, stop, loss_all, correct_all, n_all = reduce_step(loss_sum, correct, n, stop_requested)
                skip = nonfinite > 0
            backward(loss / k, last, skip)
    return StepOut(loss=float("nan") if skip else loss_all / n_all, top1=correct_all / n_all, images=int(n_all),
                   skipped=skip, stop=stop > 0)


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
