"""dist.backend=deepspeed: imnet's optimizer under DeepSpeed (ZeRO 0-3), the DeepSpeed JSON generated
from imnet's config, and checkpoints as DeepSpeed's sharded folder plus imnet's file naming it.
DeepSpeed itself is imported only when an engine is built."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil

import torch

from imnet import atomic, checkpoint, resume
from imnet import dist as imdist
from imnet.dtypes import DTYPES
from imnet.engine.step import StepOut, make_optimizer, micro_batch_step

# DeepSpeed keys imnet derives from its own config: an override that contradicts one would leave imnet's
# data loader, lr scaling, logs or evaluation disagreeing with what DeepSpeed does, so it is an error
# naming the imnet key to set instead. Every other DeepSpeed key is the user's (dist.deepspeed_config).
_DS_OWNED = {"train_batch_size": "data.batch_size x optim.accum_steps x world",
             "train_micro_batch_size_per_gpu": "data.batch_size",
             "gradient_accumulation_steps": "optim.accum_steps",
             "gradient_clipping": "optim.grad_clip",
             "zero_optimization.stage": "dist.zero_stage",
             "bf16.enabled": "precision.amp", "fp16.enabled": "precision.amp"}
_DS_TAG = re.compile(r"^ds_(\d{8})$")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _get(tree: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def deepspeed_config(cfg, world: int, n_params: int | None = None) -> dict:
    """The DeepSpeed JSON for this run: generated from imnet's config, `dist.deepspeed_config` deep-merged on top.

    No "optimizer" and no "scheduler": imnet builds the torch optimizer (make_optimizer: SGD momentum or
    AdamW, no weight decay on norms, exactly as under DDP) and sets its lr before every step.
    `n_params`: the model's parameter count, to size ZeRO's gradient bucket.
    """
    amp = cfg.precision.amp
    ds = {
        "train_batch_size": cfg.data.batch_size * cfg.optim.accum_steps * world,  # images per optimizer step
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,                    # images per rank per micro-batch
        "gradient_accumulation_steps": cfg.optim.accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,          # max global grad norm, 0: off
        "zero_optimization": {"stage": cfg.dist.zero_stage},
        # bf16/fp16: DeepSpeed's own mixed precision (16-bit weights, fp32 master weights in the optimizer)
        "bf16": {"enabled": amp == "bf16"},
        "fp16": {"enabled": amp == "fp16"},
        "zero_allow_untested_optimizer": True,             # ZeRO wraps imnet's torch SGD/AdamW
    }
    if amp == "fp16":  # dynamic loss scale starting at precision.init_scale, as the DDP GradScaler does
        ds["fp16"].update(loss_scale=0, initial_scale_power=round(math.log2(cfg.precision.init_scale)))
    if cfg.dist.zero_stage > 0 and n_params:
        # ZeRO allocates its whole gradient bucket every micro-step (default 5e8 elements: 2 GB in fp32);
        # one larger than the model only wastes memory, and time under run.deterministic (torch then
        # fills every new tensor, slow on a CPU for a bucket that size). Same sums, grouped differently.
        ds["zero_optimization"]["reduce_bucket_size"] = min(500_000_000, n_params)
    user = cfg.dist.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise RuntimeError(f"dist.deepspeed_config.{key}: imnet builds the optimizer (optim.*) and sets the lr "
                               f"every step (optim.schedule); remove {key!r}")
    for key, imnet_key in _DS_OWNED.items():
        mine, theirs = _get(ds, key), _get(user, key)
        if theirs is not None and theirs != mine:
            raise RuntimeError(f"dist.deepspeed_config.{key}={theirs!r} contradicts imnet's {mine!r}: set {imnet_key} "
                               "instead")
    return _deep_merge(ds, user)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            atomic.fsync_path(os.path.join(root, name))
        atomic.fsync_path(root)


class DeepSpeedEngine:
    """DDPEngine's interface on a DeepSpeed engine (ZeRO 0-3, fp32 / bf16, fp16 on GPU).

    The torch optimizer is imnet's own (so SGD momentum / AdamW and the no-weight-decay norm groups are the
    same as under DDP); DeepSpeed wraps it (ZeRO partitions its state) and does the gradient all-reduce /
    reduce-scatter, clipping and the 16-bit master weights. A checkpoint is DeepSpeed's sharded folder,
    written by every rank, plus imnet's small ckpt_XXXXXXXX.pt naming it (see save/load).
    """

    def __init__(self, cfg, model: torch.nn.Module, d: imdist.Dist, run_dir: str | None = None):
        if cfg.precision.amp == "fp16" and d.device.type != "cuda":
            raise RuntimeError("precision.amp=fp16 with dist.backend=deepspeed needs a GPU: DeepSpeed has no fp16 "
                               "training on the CPU; use precision.amp=bf16 or off there")
        try:
            import deepspeed
        except ImportError as e:
            raise RuntimeError('dist.backend=deepspeed needs DeepSpeed: pip install -e ".[deepspeed]"') from e
        import logging

        deepspeed.utils.logger.setLevel(logging.WARNING)  # imnet logs the run; DeepSpeed's INFO is per-rank noise
        self.cfg, self.dist, self.device = cfg, d, d.device
        # Weights stay in the contiguous format even with model.channels_last: DeepSpeed broadcasts them
        # as bytes (which needs a unit last stride) and ZeRO flattens them into contiguous buffers anyway;
        # the loader still feeds channels-last images, and convolutions then compute channels-last.
        model = model.to(d.device, memory_format=torch.contiguous_format)
        self.optimizer = make_optimizer(cfg, model, fused=False)  # imnet sets its lr every step; DeepSpeed steps it
        self.ds_config = deepspeed_config(cfg, d.world, sum(p.numel() for p in model.parameters()))
        # ZeRO-3 partitions the model in place: keep an unpartitioned copy to evaluate (see eval_module)
        self._eval_copy = copy.deepcopy(model) if _get(self.ds_config, "zero_optimization.stage") == 3 else None
        os.environ.setdefault("LOCAL_RANK", str(d.local_rank))  # DeepSpeed asserts it (srun does not set it)
        # dist_init_required=False: DeepSpeed reuses the process group dist.setup made.
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                config=copy.deepcopy(self.ds_config), dist_init_required=False)
        self.module = self.ds.module  # the bare model (16-bit weights under bf16/fp16): eval, BN stats
        # DeepSpeed's bf16/fp16 casts the weights, not the inputs
        self.input_dtype = (DTYPES["bf16"] if self.ds.bfloat16_enabled() else
                            DTYPES["fp16"] if self.ds.fp16_enabled() else None)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        if run_dir and d.is_main:  # the resolved DeepSpeed JSON, next to config.yaml
            os.makedirs(run_dir, exist_ok=True)
            atomic.write(os.path.join(run_dir, "deepspeed.json"),
                         lambda f: f.write(json.dumps(self.ds_config, indent=2).encode()))

    def train_step(self, micro_batches: list, lr: float, stop_requested: bool = False) -> StepOut:
        self.module.train()
        for g in self.optimizer.param_groups:  # the torch optimizer DeepSpeed steps (ZeRO keeps these groups)
            g["lr"] = lr
        out = micro_batch_step(micro_batches, stop_requested, self.device, context=self._boundary,
                               forward=self._forward, backward=self._backward)
        if self.ds.optimizer is self.optimizer and out.skipped:
            # fp32 without ZeRO: DeepSpeed steps the torch optimizer itself, with no overflow check; a
            # parameter without a gradient is left alone (weights and momentum). The host reads the flag
            # here (DeepSpeed's own overflow checks read theirs on the host too).
            for p in self.module.parameters():
                p.grad = None
        self.ds.step()
        return out

    def _boundary(self, last: bool):
        # The caller owns the accumulation boundary: gradients are reduced (and the step taken) once,
        # after the last of the k micro-batches it was given.
        self.ds.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def _forward(self, x, y):
        if self.input_dtype is not None:   # DeepSpeed's bf16/fp16 casts the weights, not the inputs
            x = x.to(self.input_dtype)
        logits = self.ds(x)
        return logits, self.loss_fn(logits.float(), y)

    def _backward(self, loss, last: bool, stats):
        # A step to skip comes poisoned on every rank to its last backward (micro_batch_step: NaN loss ->
        # NaN gradients everywhere), so DeepSpeed's own overflow check drops the accumulated gradients of
        # all k micro-batches, whatever the ZeRO stage.
        self.ds.backward(loss, scale_wrt_gas=False)

    # -- state --

    def _fp32_masters(self) -> dict[int, torch.Tensor]:
        """id(param) -> its fp32 master copy, where the optimizer keeps one apart from the 16-bit weights."""
        opt = self.ds.optimizer
        out: dict[int, torch.Tensor] = {}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):  # bf16/fp16 without ZeRO
            for lo, hi in zip(opt.fp16_groups, opt.fp32_groups):
                out.update({id(p): m for p, m in zip(lo, hi)})
        return out

    def state_dict(self) -> dict:
        """{"model": the full fp32 weights + buffers}, the same keys as the bare model's. A collective
        under ZeRO (every rank calls it); the optimizer state lives in DeepSpeed's checkpoint (save)."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = self._fp32_masters()
        sd = self.module.state_dict()
        names = {id(p): name for name, p in self.module.named_parameters()}
        for p in self.module.parameters():
            full = safe_get_full_fp32_param(p)  # ZeRO 1-3 / bf16 optimizer: gathered over ranks
            if full is None:
                full = masters.get(id(p))
            if full is not None:  # ZeRO-3 leaves the module an empty placeholder: ds_shape is the real one
                sd[names[id(p)]] = full.detach().reshape(getattr(p, "ds_shape", p.shape))
        return {"model": {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
                          for k, v in sd.items()}}

    @contextlib.contextmanager
    def eval_module(self):
        """`with engine.eval_module() as m: evaluate(m, ...)` on every rank. ZeRO 0-2: `module` itself.
        ZeRO-3 shards every parameter and gathers it with a collective inside each forward, which hangs
        when ranks run different numbers of forwards (uneven validation shards; DeepSpeed's
        GatheredParameters does not stop its hooks from re-gathering): so it evaluates a plain fp32 copy
        loaded with the gathered weights (one full model per rank while evaluating)."""
        if self._eval_copy is None:
            yield self.module
            return
        self._eval_copy.load_state_dict(self.state_dict()["model"])
        yield self._eval_copy

    def load_state_dict(self, sd: dict) -> None:
        raise RuntimeError("a DeepSpeed engine restores from its sharded checkpoint on every rank: use "
                           "engine.load(path)")

    def save(self, ckpt: checkpoint.Checkpointer, state: dict, step: int) -> None:
        """Every rank calls (DeepSpeed hangs if only rank 0 saves). Layout in ckpt.folder:
            ds_XXXXXXXX/   DeepSpeed's folder: model states + each rank's optimizer shard (written by all)
            ckpt_XXXXXXXX.pt  imnet's file: "deepspeed" (that folder's name), full fp32 "model" (for evaluate),
                              step/epoch/pos/RNG states/config; written last, by rank 0, then `latest`.
        So `latest` names a .pt only when every rank's shards are on disk; a folder without its .pt (a run
        killed while saving) is never resumed from and is pruned with the checkpoints beyond ckpt.keep."""
        tag = f"ds_{step:08d}"
        self.ds.save_checkpoint(ckpt.folder, tag=tag, save_latest=False)  # no DeepSpeed `latest`: imnet's is the one
        model = self.state_dict()
        imdist.barrier()  # every rank finished writing its shards
        if not ckpt.is_main:
            return
        _fsync_tree(os.path.join(ckpt.folder, tag))
        ckpt.save({**model, **state, "deepspeed": tag}, step)
        have = {os.path.basename(p)[len("ckpt_"):-len(".pt")] for p in ckpt.saved()}
        for name in os.listdir(ckpt.folder):
            m = _DS_TAG.match(name)
            if m and m.group(1) not in have and name != tag:
                shutil.rmtree(os.path.join(ckpt.folder, name), ignore_errors=True)

    def load(self, path: str) -> dict:
        """Every rank calls: DeepSpeed's folder named by imnet's .pt file `path` (next to it) restores the
        weights, fp32 masters and optimizer shards; returns the .pt's dict (step, RNG states, ...)."""
        return self.restore(checkpoint.load(path), path)

    def restore(self, state: dict, path: str) -> dict:
        """`load` for the .pt's dict already read from `path`."""
        if why := resume.backend_mismatch(state, path, deepspeed=True):
            raise resume.ResumeError(why)
        tag = state["deepspeed"]
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(os.path.join(folder, tag)):
            raise RuntimeError(f"{path} names the DeepSpeed checkpoint folder {tag}/, which is not in {folder}")
        loaded, _ = self.ds.load_checkpoint(folder, tag=tag, load_module_strict=True, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {os.path.join(folder, tag)}")
        return state
