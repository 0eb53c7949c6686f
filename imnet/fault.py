"""Fault injection, for tests and for trying a recovery path by hand. Off unless IMNET_FAULT is set:

    IMNET_FAULT="kind@step=N[,rank=R][,attempt=A][,seconds=S]"      (several: separate with ";")

    crash      SIGKILL this process when step N starts (a lost node, an OOM kill)
    hang       SIGSTOP this process when step N starts (a hung rank: the others wait in the next all-reduce)
    raise      raise RuntimeError when step N starts (a bug on one rank)
    nan        feed step N's batch as NaN images, so this rank's loss is non-finite
    signal     send this process SIGTERM when step N starts (a stop request on one rank, as Slurm's would be)
    slow_ckpt  stall S seconds (default 20) after the first bytes of step N's checkpoint: a kill lands mid-file

`step` is an optimizer step counted from 1 (the step about to run), or a range `A-B` (inclusive).
`rank` defaults to 0; `attempt` (torchrun's restart count, dist.attempt()) to every attempt.

IMNET_TRACE_SAMPLES=1 makes every rank append the dataset indices of each step it trains to
`<run folder>/samples/rank<R>.jsonl`: {"attempt", "epoch", "step", "ids"}; tests use it to prove
that a run restarted any number of times trains every sample of every epoch exactly once.

IMNET_TRACE_COLLECTIVES=1 makes every rank append each collective imnet calls (torch.distributed's
Python functions: name, tensor shapes and dtypes) to `<run folder>/collectives/rank<R>.jsonl`;
tests compare the ranks' lists (torch's own checker, TORCH_DISTRIBUTED_DEBUG=DETAIL, crashes DDP
on gloo in torch 2.14).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch

from imnet import dist

ENV = "IMNET_FAULT"
TRACE_ENV = "IMNET_TRACE_SAMPLES"
COLLECTIVES_ENV = "IMNET_TRACE_COLLECTIVES"
TRACED = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
          "reduce_scatter_tensor", "all_gather_into_tensor")
KINDS = ("crash", "hang", "raise", "nan", "signal", "slow_ckpt")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int = 0
    attempt: Optional[int] = None
    seconds: float = 20.0

    def hits(self, step: int, rank: int, attempt: int) -> bool:
        return (self.first <= step <= self.last and rank == self.rank
                and (self.attempt is None or self.attempt == attempt))


def parse(text: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, args = part.partition("@")
        if kind not in KINDS:
            raise FaultSpecError(f"{ENV}: unknown fault {kind!r} in {part!r} (one of: {', '.join(KINDS)})")
        kw: dict = {}
        for item in filter(None, args.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in ("step", "rank", "attempt", "seconds"):
                raise FaultSpecError(f"{ENV}: {item!r} in {part!r} is not step=N, rank=R, attempt=A or seconds=S")
            try:
                if key == "step":
                    lo, _, hi = value.partition("-")
                    kw["first"], kw["last"] = int(lo), int(hi or lo)
                else:
                    kw[key] = float(value) if key == "seconds" else int(value)
            except ValueError:
                raise FaultSpecError(f"{ENV}: {key}={value!r} in {part!r} is not a number") from None
        if "first" not in kw:
            raise FaultSpecError(f"{ENV}: {part!r} has no step=N")
        faults.append(Fault(kind, **kw))
    return faults


class Injector:
    """The faults that apply to this process (none when IMNET_FAULT is unset)."""

    def __init__(self, rank: int):
        self.rank, self.attempt = rank, dist.attempt()
        self.faults = parse(os.environ.get(ENV, ""))

    def _hit(self, kind: str, step: int) -> Optional[Fault]:
        return next((f for f in self.faults if f.kind == kind and f.hits(step, self.rank, self.attempt)), None)

    def before_step(self, step: int, micro: list) -> None:
        """Called as optimizer step `step` (1-based) starts, with its micro-batches."""
        if not self.faults:
            return
        if self._hit("crash", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("hang", step):
            os.kill(os.getpid(), signal.SIGSTOP)
        if self._hit("signal", step):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns: a request, not a kill
        if self._hit("raise", step):
            raise RuntimeError(f"{ENV}: injected error at step {step} on rank {self.rank}")
        if self._hit("nan", step):
            micro[:] = [(torch.full_like(x, float("nan")), y) for x, y in micro]  # new tensors: a loader's
            # buffers (the GPU-resident set) stay intact

    def checkpoint_file(self, f, step: int):
        """The file object a checkpoint of `step` is written through: slowed down under slow_ckpt."""
        fault = self._hit("slow_ckpt", step) if self.faults else None
        return _SlowFile(f, fault.seconds) if fault else f


class _SlowFile:
    """Writes the first piece, flushes it, then stalls `seconds` before the rest: for that long the
    temp file holds part of a checkpoint."""

    def __init__(self, f, seconds: float):
        self.f, self.seconds, self.stalled = f, seconds, False

    def write(self, b) -> int:
        n = self.f.write(b)
        if not self.stalled:
            self.stalled = True
            self.f.flush()
            os.fsync(self.f.fileno())
            time.sleep(self.seconds)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


class SampleTrace:
    """IMNET_TRACE_SAMPLES=1: this rank's dataset indices of every step, appended as JSON lines."""

    def __init__(self, run_dir: str, rank: int):
        self.file = None
        if os.environ.get(TRACE_ENV, "") not in ("", "0"):
            folder = os.path.join(run_dir, "samples")
            os.makedirs(folder, exist_ok=True)
            self.file = open(os.path.join(folder, f"rank{rank}.jsonl"), "a", buffering=1)
            self.attempt = dist.attempt()
        self.ids: Optional[torch.Tensor] = None

    def start_epoch(self, sampler, per_step: int) -> None:
        """At the (re)start of an epoch: this rank's remaining indices, `per_step` per optimizer step."""
        if self.file:
            self.ids, self.per_step, self.done = sampler.epoch_indices()[0], per_step, 0

    def step(self, epoch: int, step: int) -> None:
        if self.file:
            ids = self.ids[self.done * self.per_step:(self.done + 1) * self.per_step].tolist()
            self.done += 1
            self.file.write(json.dumps({"attempt": self.attempt, "epoch": epoch, "step": step, "ids": ids}) + "\n")


def _describe(x):
    if isinstance(x, torch.Tensor):
        return [list(x.shape), str(x.dtype)]
    if isinstance(x, (list, tuple)):
        return [_describe(v) for v in x] if all(isinstance(v, torch.Tensor) for v in x) else len(x)
    return None


def trace_collectives(run_dir: str, rank: int) -> None:
    """IMNET_TRACE_COLLECTIVES=1: wrap torch.distributed's collectives (as imnet calls them) to log each call."""
    if os.environ.get(COLLECTIVES_ENV, "") in ("", "0"):
        return
    import torch.distributed as tdist

    folder = os.path.join(run_dir, "collectives")
    os.makedirs(folder, exist_ok=True)
    log = open(os.path.join(folder, f"rank{rank}.jsonl"), "a", buffering=1)  # open for the life of the process

    def tracer(name: str, orig):
        def traced(*args, **kw):
            log.write(json.dumps([name, [_describe(a) for a in args]]) + "\n")
            return orig(*args, **kw)
        return traced

    for name in TRACED:
        setattr(tdist, name, tracer(name, getattr(tdist, name)))
