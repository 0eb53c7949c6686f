"""The engines: forward/backward/step with mixed precision, gradient accumulation, clipping, and the
per-step all-reduce that keeps every rank's decisions (skip a non-finite step, stop) identical.
step.py holds what both share, ddp.py and deepspeed.py one engine each.

Two engines behind one small interface: DDP (default) and DeepSpeed (dist.backend=deepspeed, ZeRO 0-3):
    out = engine.train_step(micro_batches, lr, stop_requested)   # -> StepOut, on the device
    meter.add(out); meter.read() at log steps                     # the trainer's sums, read late
    engine.save(ckpt, state, step) / state = engine.load(path)   # every rank calls both
    engine.restore(state, path)                                  # load, for a dict already read
    engine.state_dict() / engine.load_state_dict(sd) / engine.module (the bare model, for eval & save)
"""

from __future__ import annotations

import torch

from imnet import dist as imdist
from imnet.engine import graph
from imnet.engine.ddp import DDPEngine
from imnet.engine.deepspeed import DeepSpeedEngine, deepspeed_config  # imports DeepSpeed only when built
from imnet.engine.graph import GraphStep
from imnet.engine.meter import Meter
from imnet.engine.step import (
    Engine,
    StepOut,
    autocast,
    make_optimizer,
    nonfinite_params,
    param_groups,
    reduce_step,
    shapes,
)

__all__ = ["DDPEngine", "DeepSpeedEngine", "Engine", "GraphStep", "Meter", "StepOut", "autocast", "build",
           "deepspeed_config", "graph", "make_optimizer", "nonfinite_params", "param_groups", "reduce_step", "shapes"]


def build(cfg, model: torch.nn.Module, d: imdist.Dist, run_dir: str | None = None) -> Engine:
    """DeepSpeedEngine for dist.backend=deepspeed (DeepSpeed is imported only then), else DDPEngine. `run_dir`: where
    the DeepSpeed engine writes its resolved JSON (deepspeed.json)."""
    if cfg.dist.backend == "deepspeed":
        return DeepSpeedEngine(cfg, model, d, run_dir)
    return DDPEngine(cfg, model, d)
