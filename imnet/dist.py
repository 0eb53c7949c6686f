"""Everything about processes: where the rank comes from, the process group, and rank helpers.

Three ways to be started, detected in this order:
  torchrun (or submitit / anything that exports RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
  srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the step's node list),
  a plain `python -m imnet.train` (one process, no process group).
gloo on the CPU is a first-class backend; NCCL on the GPU.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch.distributed.rendezvous import rendezvous

# Exit status of a run stopped by a signal after writing its checkpoint: run the same command again to
# resume. 75 is EX_TEMPFAIL ("temporary failure, retry"); slurm/train.sbatch requeues on it, and a Slurm
# admin can list it in slurm.conf's RequeueExit.
EXIT_STOPPED = 75

# The process group times out this long after dist.timeout_s: a training step that waits longer than
# dist.timeout_s is reported first, by the heartbeat watchdog, which names the rank it waits for.
PG_GRACE_S = 30


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None when there is no process group (world 1)
    launcher: str           # "torchrun" | "submitit" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list -> host names: "gpu[01-03,7],cpu1" -> gpu01 gpu02 gpu03 gpu7 cpu1.

    Slurm's own `scontrol show hostnames` where it runs (a Slurm node: scontrol on PATH, with its
    config); parse_nodelist where it does not (no Slurm installed, or scontrol without a slurm.conf)."""
    if not nodelist:
        return []  # scontrol would expand $SLURM_JOB_NODELIST instead
    if shutil.which("scontrol"):
        try:
            p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30)
            if p.returncode == 0 and p.stdout.split():
                return p.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return parse_nodelist(nodelist)


def parse_nodelist(nodelist: str) -> list[str]:
    """expand_nodelist without Slurm: prefix[ranges] items, zero padding kept ([01-03] -> 01 02 03).
    Kept for processes started without Slurm's tools at hand (torchrun, submitit's local executor, tests)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?(?:,|$)", nodelist):
        prefix, ranges = m.group(1), m.group(2)
        if not prefix:
            continue
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                width = len(lo)  # zero padding is kept: [01-03] -> 01 02 03
                hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + lo)
    return hosts


def detect(env: Optional[dict] = None) -> tuple[str, int, int, int]:
    """(launcher, rank, world, local_rank) from the environment; sets MASTER_ADDR/PORT for srun."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or launch/submit.py (submitit exports the same)
        launcher = "submitit" if "SUBMITIT_EXECUTOR" in env else "torchrun"
        return launcher, int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # inside an srun step
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world > 1:
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
            env.setdefault("MASTER_ADDR", expand_nodelist(nodes)[0] if nodes else "127.0.0.1")
            # one port per job so two jobs sharing a node do not collide
            env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return "slurm", int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0))
    return "single", 0, 1, 0


def attempt() -> int:
    """Which attempt of a torchrun job this is (0, then 1, 2, ... after --max-restarts restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def setup(cfg) -> Dist:
    """Join the process group described by the environment. `cfg` is the config's `dist` section."""
    launcher, rank, world, local_rank = detect()
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("dist.device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    # deepspeed is an engine, not a process-group backend: it runs over the group made here (DeepSpeed
    # reuses an initialized torch.distributed group), nccl on GPU, gloo on CPU like auto.
    deepspeed = cfg.backend == "deepspeed"
    backend = cfg.backend if cfg.backend not in ("auto", "deepspeed") else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("dist.backend=nccl needs CUDA tensors; use gloo (or auto) on the CPU")
    if world > 1:
        if not tdist.is_initialized():
            timeout = datetime.timedelta(seconds=cfg.timeout_s + PG_GRACE_S)
            store, _, _ = next(rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
            # Under torchrun the store is the agent's and outlives the workers: one store for every restart
            # (static and c10d rendezvous alike). Without a prefix per attempt, a restarted group reads the
            # previous attempt's gloo/NCCL peer addresses and dials dead ports, or hangs. The count is per
            # agent, so this is exact on one node (RELIABILITY.md).
            store = tdist.PrefixStore(f"imnet/attempt_{attempt()}", store)
            tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                     device_id=device if device.type == "cuda" else None)
    elif deepspeed:
        # DeepSpeed needs a process group even for one process (without one it goes looking for MPI):
        # a one-rank group on an in-process store, no port.
        if not tdist.is_initialized():
            tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1,
                                     timeout=datetime.timedelta(seconds=cfg.timeout_s))
    else:
        backend = None
    return Dist(rank, world, local_rank, device, backend, launcher)


def report_error(message: str) -> None:
    """`message` on stderr, and in torchrun's error file (a no-op outside torchrun), so torchrun's
    failure summary shows it as this rank's error."""
    import sys

    print(message, file=sys.stderr, flush=True)
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:
            raise RuntimeError(message)
        except RuntimeError as e:  # raised: torchrun's summary prints the traceback text, which then holds it
            ErrorHandler().record_exception(e)
    except Exception:  # the message is on stderr either way
        pass


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place sum/avg/max over ranks (a no-op for one process); returns `t`."""
    if active():
        if op == "avg":
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t /= tdist.get_world_size()
        else:
            tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op])
    return t


def all_gather_object(obj: Any) -> list:
    if not active():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        tdist.barrier()


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def average_buffers(model: torch.nn.Module) -> None:
    """Make BN running stats equal on every rank (the mean over ranks) before evaluating or saving.

    Without SyncBN each rank's BN sees only its own images, so the buffers drift apart and rank 0's
    checkpoint would not be the model the other ranks evaluated.
    """
    if not active():
        return
    for name, buf in model.named_buffers():
        if buf.is_floating_point() and (name.endswith("running_mean") or name.endswith("running_var")):
            all_reduce(buf, "avg")
