"""Learning rate as a pure function of the optimizer step (nothing to save but the step itself)."""

from __future__ import annotations

import math


def peak_lr(base_lr: float, global_batch: int, scaling: str) -> float:
    """The GN paper's (and Goyal et al.'s) linear rule: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256 if scaling == "linear" else base_lr


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """The run's optimizer steps: every epoch, or run.max_steps if that comes first."""
    return steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)


def get_lr(step: int, *, peak: float, steps_per_epoch: int, total_steps: int, schedule: str,
           warmup_epochs: float = 0.0, milestones=(), gamma: float = 0.1, min_lr: float = 0.0) -> float:
    """lr for optimizer step `step` (0-based). Warmup ramps linearly from peak/warmup_steps to peak."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "step":
        epoch = step / steps_per_epoch  # fractional epoch; milestones are in epochs
        return peak * gamma ** sum(epoch >= m for m in milestones)
    if schedule == "cosine":
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}")
