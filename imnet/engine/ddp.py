"""The default engine: DistributedDataParallel (or the bare model on one process), torch AMP."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from imnet import checkpoint, resume
from imnet import dist as imdist
from imnet.engine.step import StepOut, autocast, make_optimizer, micro_batch_step, skip_flag


class DDPEngine:
    def __init__(self, cfg, model: torch.nn.Module, d: imdist.Dist):
        self.cfg, self.dist, self.device = cfg, d, d.device
        # model.channels_last: the weights too on a GPU (cuDNN would convert them every call); on the CPU
        # they stay contiguous, since oneDNN reorders them itself and the fused optimizer would copy
        # channels-last ones (the images and activations are channels-last either way)
        cl = cfg.model.channels_last and d.device.type == "cuda"
        fmt = torch.channels_last if cl else torch.contiguous_format
        self.module = model.to(d.device, memory_format=fmt)  # the bare model: eval, save, load
        self.optimizer = make_optimizer(cfg, self.module)
        self._init_state()
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
        out = micro_batch_step(micro_batches, stop_requested, self.device, context=self._sync_context,
                               forward=self._forward, backward=self._backward)
        self.update(skip_flag(out.stats))
        self.optimizer.zero_grad(set_to_none=True)   # a skipped step's gradients are dropped
        return out

    def update(self, skip: torch.Tensor) -> None:
        """The optimizer step, skipped where `skip` (a device flag, 1.0 or 0.0) is set, with no host read:
        the fused optimizer takes it as its `found_inf`. Under fp16 GradScaler decides from the poisoned
        gradients (micro_batch_step), so a skipped step also halves the loss scale, as any overflow does."""
        opt, clip = self.optimizer, self.cfg.optim.grad_clip
        if self.scaler.is_enabled():
            if clip > 0:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            self.scaler.step(opt)
            self.scaler.update()
            return
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        opt.found_inf = skip
        try:
            opt.step()
        finally:
            del opt.found_inf

    def _init_state(self) -> None:
        """Fused SGD creates its momentum buffers uninitialized on its first step, and a skipped first step
        would leave them so: start them at zero (the same update: with dampening 0, the first step's
        buffer is the gradient either way). A checkpoint's optimizer state may come without fused=True."""
        for g in self.optimizer.param_groups:
            g["fused"], g["foreach"] = True, None
            if g.get("momentum", 0):
                for p in g["params"]:
                    st = self.optimizer.state[p]
                    if st.get("momentum_buffer") is None:
                        st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _forward(self, x, y):
        with autocast(self.device, self.cfg.precision.amp):
            logits = self.net(x)
            return logits, self.loss_fn(logits.float(), y)

    def _backward(self, loss, last: bool, stats):
        # Also for a step to skip: DDP's reducer expects the backward of every forward; the step's
        # gradients are dropped after it.
        self.scaler.scale(loss).backward()

    def state_dict(self) -> dict:
        opt = self.optimizer.state_dict()
        for g in opt["param_groups"]:  # a captured step's lr is a device tensor (graph.py): saved as a number
            if isinstance(g["lr"], torch.Tensor):
                g["lr"] = g["lr"].item()
        return {"model": self.module.state_dict(), "optimizer": opt, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["model"])  # strict: a mismatch is an error, never a print
        self.optimizer.load_state_dict(sd["optimizer"])
        self._init_state()
        if sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])

    @contextlib.contextmanager
    def eval_module(self):
        """`with engine.eval_module() as m: evaluate(m, ...)` on every rank: DDP evaluates `module` itself."""
        yield self.module

    def save(self, ckpt: checkpoint.Checkpointer, state: dict, step: int) -> None:
        """Every rank calls; rank 0 writes model + optimizer + `state` as one file and moves `latest`."""
        ckpt.save({**self.state_dict(), **state}, step)

    def load(self, path: str) -> dict:
        """Every rank calls: restore the engine from checkpoint `path`; returns the whole saved dict."""
        return self.restore(checkpoint.load(path), path)

    def restore(self, state: dict, path: str) -> dict:
        """`load` for a checkpoint dict already read from `path` (the trainer checks it before restoring)."""
        if why := resume.backend_mismatch(state, path, deepspeed=False):
            raise resume.ResumeError(why)
        self.load_state_dict(state)
        return state
