"""Sinks, rank 0 only: the run folder's metrics.jsonl (one JSON object per event), a tqdm bar, W&B and
TensorBoard, and the run's identity (resolved config, git commit, package versions).

Every sink gets the same numbers. A record is `split` (train | val), `step` (imnet's optimizer step,
the x axis of every chart), `epoch` and metrics; W&B and TensorBoard see them as `train/loss`,
`val/top1`, ... (peak memory as `sys/peak_mem_gb`).

Resume: metrics.jsonl (written line by line, so it survives a SIGKILL) drops what was logged after
the checkpoint and is then the one trajectory every sink is made to show. W&B and TensorBoard buffer
what they are given, so a killed attempt can lose its last records: TensorBoard hides every earlier
event (`purge_step=1`) and is given the kept records again; W&B continues the same run (its id is
kept in the run folder) and is sent the kept records and new steps it does not hold yet (read from
its run files), so no step is lost or charted twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

from imnet import atomic, wandb_file

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_id"   # in the run folder: the W&B run id, made once
DONE = "DONE"           # in the run folder: the run reached its last step (written by train.fit)
SYS_KEYS = {"peak_mem_gb"}  # charted under sys/, not under the split


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict:
    import numpy
    import torch
    import torchvision

    import imnet

    return {"imnet": imnet.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class SinkError(RuntimeError):
    """A sink cannot start (a missing package, no W&B credentials): the message says what to do."""


def _key(split: str, k: str) -> str:
    return f"sys/{k}" if k in SYS_KEYS else f"{split}/{k}"


def _scalars(record: dict) -> dict:
    """The chartable numbers of a record, under their sink keys."""
    skip = {"split", "step", "epoch", "time", "n"}
    return {_key(record["split"], k): float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float))}


class TensorBoardSink:
    def __init__(self, run_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SinkError('log.tensorboard=true needs the tensorboard package: '
                            'pip install -e ".[tensorboard]"') from None
        # purge_step=1: TensorBoard hides the events of earlier attempts; Logger.start logs the kept ones again
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=1)

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, global_step=record["step"])

    def close(self, summary: dict, exit_code: int, preempted: bool) -> None:
        self.writer.close()

    def sync_hint(self) -> None:
        return None  # event files are read where they are


class WandbSink:
    """One W&B run per run folder: its id is kept in `run_dir/wandb_id`, and every attempt (a rerun
    after a kill, a Slurm requeue) resumes it with `resume="allow"`."""

    def __init__(self, run_dir: str, lcfg, identity: dict):
        try:
            import wandb
        except ImportError:
            raise SinkError(f'log.wandb={lcfg.wandb} needs the wandb package: pip install -e ".[wandb]"') from None
        self.wandb_dir = os.path.join(os.environ.get("WANDB_DIR") or run_dir, "wandb")
        os.makedirs(self.wandb_dir, exist_ok=True)
        self.run_id = _run_id(run_dir)
        # the steps an earlier attempt already sent (its local run files, online and offline alike)
        self.sent = max((wandb_file.last_step(p) for p in self.run_files()), default=-1)
        name = identity["config"]["run"]["name"]
        group, _, point = name.rpartition("/")  # a sweep point's run.name is <sweep>/<point>
        c = identity["config"]
        tags = [f"norm={c['model']['norm']}", f"img_per_gpu={c['data']['batch_size']}", f"data={c['data']['name']}",
                f"arch={c['model']['arch']}", f"world={identity['world']}", *lcfg.wandb_tags]
        mode = os.environ.get("WANDB_MODE") or lcfg.wandb  # WANDB_MODE keeps its meaning (disabled, offline)
        try:
            # the process-wide settings too: W&B's own usage telemetry reads those, and would try the
            # network from an offline run
            wandb.setup(settings=wandb.Settings(mode=mode))
            self.run = wandb.init(
                id=self.run_id, resume="allow", mode=mode, dir=os.path.dirname(self.wandb_dir),
                project=lcfg.wandb_project or os.environ.get("WANDB_PROJECT") or "imnet",
                entity=lcfg.wandb_entity, group=group or name, name=point, job_type="train", tags=tags,
                config={**c, **{k: identity[k] for k in ("world", "global_batch", "peak_lr", "git_commit")}})
        except wandb.errors.UsageError as e:
            raise SinkError(f"log.wandb={lcfg.wandb}: W&B cannot start: {e} (run `wandb login` or set WANDB_API_KEY "
                            "on this node, or use log.wandb=offline and `wandb sync` later)") from None
        self.offline = self.run.offline
        if not self.offline:
            self.sent = max(self.sent, self.run.step - 1)
        self.run.define_metric("trainer/step")
        for prefix in ("train", "val", "sys"):
            self.run.define_metric(f"{prefix}/*", step_metric="trainer/step")

    def run_files(self) -> list[str]:
        import glob

        return sorted(glob.glob(os.path.join(self.wandb_dir, f"*run-*-{self.run_id}", f"run-{self.run_id}.wandb")))

    def log(self, record: dict) -> None:
        step = record["step"]
        if step <= self.sent:  # W&B has this step from an earlier attempt
            return
        self.run.log({**_scalars(record), "trainer/step": step, "trainer/epoch": record["epoch"]}, step=step)

    def close(self, summary: dict, exit_code: int, preempted: bool) -> None:
        self.run.summary.update(summary)
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)

    def sync_hint(self) -> str | None:
        if not self.offline:
            return None
        return f"W&B run {self.run_id} is offline; upload it with: wandb sync " + \
            os.path.join(self.wandb_dir, f"offline-run-*-{self.run_id}")


def _run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, WANDB_ID)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    import secrets

    run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
    atomic.write(path, lambda f: f.write(f"{run_id}\n".encode()))
    return run_id


class Logger:
    """Rank 0 writes; on other ranks every method is a no-op. `close` finishes every sink: call it on
    every way out (the trainer does, with the exit code and whether a signal stopped the run)."""

    def __init__(self, run_dir: str, is_main: bool, lcfg, *, total: int, initial: int):
        self.is_main, self.run_dir, self.lcfg = is_main, run_dir, lcfg
        self.bar, self.sinks, self.records, self.closed = None, [], [], False
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS)
        # resumed: drop what was logged after the checkpoint, so the file is one trajectory
        # (a fresh start, initial 0, drops everything a dead attempt wrote before its first checkpoint)
        self.records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= initial] if initial else []
        atomic.write(path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.records))
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run loses at most one line
        if lcfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def start(self, config_tree: dict, extra: dict) -> None:
        """Write config.yaml and run_info.json, then start W&B and TensorBoard (SinkError if one cannot)."""
        if not self.is_main:
            return
        import yaml

        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_tree, f, sort_keys=False)
        info = {"git_commit": git_commit(), "versions": versions(), "host": socket.gethostname(),
                "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        with open(os.path.join(self.run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        if self.lcfg.tensorboard:
            self.sinks.append(TensorBoardSink(self.run_dir))
        if self.lcfg.wandb != "off":
            self.sinks.append(WandbSink(self.run_dir, self.lcfg, {"config": config_tree, **info}))
        for sink in self.sinks:  # the kept trajectory: whatever a killed attempt's sink lost
            for record in self.records:
                sink.log(record)

    def log(self, **record) -> None:
        if not self.is_main:
            return
        record["time"] = round(time.time(), 3)
        self.file.write(json.dumps(record) + "\n")
        self.records.append(record)
        for sink in self.sinks:
            sink.log(record)

    def progress(self, steps: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def summary(self) -> dict:
        """Final and best val top-1/top-5 and the median img/s, over the whole trajectory."""
        val = [r for r in self.records if r.get("split") == "val"]
        ips = [r["img_per_s"] for r in self.records if r.get("split") == "train" and r.get("img_per_s")]
        out = {}
        if val:
            out.update({"val/final_top1": val[-1]["top1"], "val/final_top5": val[-1]["top5"],
                        "val/best_top1": max(r["top1"] for r in val), "val/best_top5": max(r["top5"] for r in val)})
        if ips:
            out["train/median_img_per_s"] = statistics.median(ips)
        return out

    def close(self, exit_code: int = 0, signum: int | None = None) -> list[str]:
        """Finish every sink once: exit_code 0 (done), 1 (an error) or 128 + signum with `signum` set
        (stopped by a signal: W&B marks the run preempted). Returns lines to print last."""
        if not self.is_main or self.closed:
            return []
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        summary, hints = self.summary(), []
        for sink in self.sinks:
            sink.close(summary, 128 + signum if signum else exit_code, preempted=signum is not None)
            if hint := sink.sync_hint():
                hints.append(hint)
        return hints


class Window:
    """Throughput since the last train record: global img/s over the time spent training (validation
    and checkpoints excluded) and the share of that time spent waiting for the loader."""

    def __init__(self, device: torch.device):
        self.device, self.images = device, 0
        self.t0, self.excluded, self.wait = _now(device), 0.0, 0.0

    @contextlib.contextmanager
    def waiting(self):
        t = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t

    @contextlib.contextmanager
    def paused(self):
        t = _now(self.device)
        yield
        self.excluded += _now(self.device) - t

    def read(self) -> dict:
        """The window's figures (and starts the next window)."""
        t = _now(self.device)
        busy = max(t - self.t0 - self.excluded, 1e-9)
        out = {"img_per_s": self.images / busy, "data_wait": min(self.wait / busy, 1.0)}
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.images, self.t0, self.excluded, self.wait = 0, t, 0.0, 0.0
        return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
