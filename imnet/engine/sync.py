"""The synchronous step imnet took before its decisions stayed on the device, kept as the reference
that tests/test_async_step.py and bench/microbatch_step.py compare the default step against: after
each step's all-reduce the host waits for the step to read whether to skip the update, and skips it
on the host (no optimizer call, no GradScaler update). Same optimizer and arithmetic otherwise."""

from __future__ import annotations

import torch

from imnet.engine.ddp import DDPEngine


class SyncDDPEngine(DDPEngine):
    def update(self, skip: torch.Tensor) -> None:
        if skip.item():  # the host waits here for the step it just queued
            return
        super().update(skip)
