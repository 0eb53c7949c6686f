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
    """One optimizer step's outcome, on the device: `stats` = [non-finite losses, stop requests, loss sum,
    correct, images], each summed over every rank's samples (reduce_step). Nothing here waits for the
    device; the properties below do (tests, the synchronous reference), the trainer reads a Meter instead."""
    stats: torch.Tensor

    @property
    def skipped(self) -> bool:   # the update was skipped: a loss was non-finite on some rank
        return bool(self.stats[0] > 0)

    @property
    def stop(self) -> bool:      # some rank asked to stop (signal)
        return bool(self.stats[1] > 0)

    @property
    def loss(self) -> float:     # mean training loss over every rank's samples (nan if the step was skipped)
        return float("nan") if self.skipped else float(self.stats[2] / self.stats[4])

    @property
    def top1(self) -> float:     # training accuracy over the same samples
        return float(self.stats[3] / self.stats[4])

    @property
    def images(self) -> int:     # images in this step, all ranks
        return int(self.stats[4])


class Engine(Protocol):
    """What the trainer and evaluate use of an engine (DDPEngine, DeepSpeedEngine)."""
    module: torch.nn.Module   # the bare model: evaluation, BN statistics, shapes

    def train_step(self, micro_batches: list, lr: float, stop_requested: bool = False) -> StepOut:
        """One optimizer step over the micro-batches (images, labels) of this rank, at learning rate lr,
        queued on the device: the host does not wait for it (DDPEngine; DeepSpeed's overflow checks do)."""

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
    `with context(last):` logits, loss = forward(x, y), then backward(loss / k, last, stats). After the
    last forward, before its backward, one all-reduce carries the decisions and the metrics
    (reduce_step), so every rank holds the same `stats` (stats[0] > 0: skip this update) before the last
    backward, which is poisoned then (NaN gradients on every rank: DeepSpeed's and GradScaler's overflow
    checks drop the step); DDP's reducer expects that backward, and DDPEngine also skips the update from
    the device flag. Nothing here waits for the device."""
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
            stats = None
            if last:
                stats = reduce_step(loss_sum, correct, n, stop_requested)
                loss = loss * poison(stats)
            backward(loss / k, last, stats)
    return StepOut(stats)


def autocast(device: torch.device, amp: str):
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    # no weight-cast cache while a CUDA graph is captured (PyTorch's CUDA graphs notes)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=not capturing)


def reduce_step(loss_sum: torch.Tensor, correct: torch.Tensor, n: int, stop_requested) -> torch.Tensor:
    """One all-reduce per step carries the decisions and the metrics together, left on the device:
    [any non-finite loss, any stop request, loss sum, correct, images], summed over ranks. The host
    values are kernel arguments (fill), never host-to-device copies."""
    flags = torch.zeros(5, device=loss_sum.device)
    flags[0] = (~torch.isfinite(loss_sum)).float()
    flags[1] = stop_requested  # a bool, or a device tensor (a captured step's input)
    flags[2] = torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0)
    flags[3] = correct.float()
    flags[4] = float(n)
    return imdist.all_reduce(flags)


def poison(stats: torch.Tensor) -> torch.Tensor:
    """NaN where the step is to be skipped, else 1.0: the last backward's loss is multiplied by it.
    (masked_fill takes the NaN as a kernel argument: no host-to-device copy, capturable.)"""
    return stats.new_ones(()).masked_fill_(stats[0] > 0, float("nan"))


def skip_flag(stats: torch.Tensor) -> torch.Tensor:
    """1.0 where the step's update is to be skipped (a non-finite loss on some rank), else 0.0: the
    `found_inf` a fused optimizer reads, on the device."""
    return (stats[0] > 0).float()


def nonfinite_params(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """1.0 on `device` if a parameter of `module` holds a NaN or an infinity, else 0.0 (a finite loss can
    still give non-finite gradients; a checkpoint must not keep what they did)."""
    flags = [(~torch.isfinite(p.detach())).any() for p in module.parameters() if p.numel()]
    return torch.stack(flags).any().float().to(device) if flags else torch.zeros((), device=device)


def param_groups(model: torch.nn.Module, weight_decay: float, norm_weight_decay: bool) -> list[dict]:
    norm_params, other = norm.split_params(model)
    if norm_weight_decay:
        return [{"params": norm_params + other, "weight_decay": weight_decay}]
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm_params, "weight_decay": 0.0}]


def make_optimizer(cfg, model: torch.nn.Module, fused: bool = True) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over param_groups. fused: torch's fused kernels, the ones that
    take a device-side `found_inf` to skip an update without the host reading it (DDPEngine.update);
    DeepSpeed steps its own way and gets foreach (fused=False)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.norm_weight_decay)
    kw = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.base_lr, momentum=o.momentum, nesterov=o.nesterov, **kw)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.base_lr, betas=tuple(o.betas), **kw)
    raise RuntimeError(f"optim.name: unsupported optimizer {o.name!r}")


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    """State-dict key -> shape of every parameter and buffer (ZeRO-3's real shape, not its placeholder's)."""
    out = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in module.named_buffers()})
    return out
