"""The DDP engine: forward/backward/step with autocast, gradient accumulation, clipping, and the
per-step all-reduce that keeps every rank's decisions (skip a non-finite step, stop) identical.

One small interface so a DeepSpeed engine can stand behind it later:
    out = engine.train_step(micro_batches, lr, stop_requested)   # -> StepOut
    engine.state_dict() / engine.load_state_dict(sd) / engine.module (the bare model, for eval & save)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from imnet import dist as imdist
from imnet import norm

DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepOut:
    loss: float      # mean training loss over every rank's samples in this step (nan if any was non-finite)
    top1: float      # training accuracy over the same samples
    images: int      # images in this step, all ranks
    skipped: bool    # the update was skipped because a loss was non-finite on some rank
    stop: bool       # some rank asked to stop (signal): every rank stops after this step


def autocast(device: torch.device, amp: str):
    dtype = DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


class DDPEngine:
    def __init__(self, cfg, model: torch.nn.Module, d: imdist.Dist):
        self.cfg, self.dist, self.device = cfg, d, d.device
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.module = model.to(d.device, memory_format=fmt)  # the bare model: eval, save, load
        self.optimizer = make_optimizer(cfg, self.module)
        self.scaler = torch.amp.GradScaler(d.device.type, init_scale=cfg.precision.init_scale,
                                           enabled=cfg.precision.amp == "fp16")
        net = self.module
        if d.world > 1:
            # broadcast_buffers=False: each rank keeps its own BN statistics (that is what BN means
            # without SyncBN); dist.average_buffers makes them equal before eval and save.
            net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                      broadcast_buffers=False)
        if cfg.model.compile:
            net = torch.compile(net)
        self.net = net
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    def _sync_context(self, last: bool):
        if not last and isinstance(self.net, DDP):
            return self.net.no_sync()  # accumulate locally; all-reduce once on the last micro-batch
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list, lr: float, stop_requested: bool = False) -> StepOut:
        self.module.train()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        k = len(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        n = 0
        for i, (x, y) in enumerate(micro_batches):
            with self._sync_context(i == k - 1):
                with autocast(self.device, self.cfg.precision.amp):
                    logits = self.net(x)
                    loss = self.loss_fn(logits.float(), y)
                self.scaler.scale(loss / k).backward()
            loss_sum += loss.detach() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            n += y.numel()
        # One all-reduce per step carries the decisions and the metrics together:
        # [any non-finite loss, any stop request, loss sum, correct, images].
        flags = torch.stack([(~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(stop_requested), device=self.device),
                             torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0),
                             correct.float(), torch.tensor(float(n), device=self.device)])
        nonfinite, stop, loss_all, correct_all, n_all = imdist.all_reduce(flags).tolist()
        skipped = nonfinite > 0
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.cfg.optim.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        return StepOut(loss=float("nan") if skipped else loss_all / n_all, top1=correct_all / n_all,
                       images=int(n_all), skipped=skipped, stop=stop > 0)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["model"])  # strict: a mismatch is an error, never a print
        self.optimizer.load_state_dict(sd["optimizer"])
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])


def build(cfg, model: torch.nn.Module, d: imdist.Dist) -> DDPEngine:
    return DDPEngine(cfg, model, d)
