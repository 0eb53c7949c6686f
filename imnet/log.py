"""Sinks, rank 0 only: the run folder's metrics.jsonl (one JSON object per event), a tqdm bar, and
the run's identity (resolved config, git commit, package versions)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Optional

METRICS = "metrics.jsonl"


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


class Logger:
    def __init__(self, run_dir: str, is_main: bool, *, progress: bool, total: int, initial: int):
        self.is_main, self.run_dir = is_main, run_dir
        self.bar = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS)
        if initial > 0:
            # resumed: drop what was logged after the checkpoint, so the file is one trajectory
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= initial]
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, path)
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run loses at most one line
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write_run_info(self, config_yaml: str, extra: dict) -> None:
        if not self.is_main:
            return
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        info = {"git_commit": git_commit(), "versions": versions(), "host": socket.gethostname(),
                "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        with open(os.path.join(self.run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)

    def log(self, **record) -> None:
        if self.is_main:
            record["time"] = round(time.time(), 3)
            self.file.write(json.dumps(record) + "\n")

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

    def close(self) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.close()
            self.file.close()
