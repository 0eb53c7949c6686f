"""Which rank keeps the others waiting: every rank's heartbeat file, and a watchdog.

Each rank keeps `<run folder>/ranks/rank<R>.json` fresh ({rank, host, pid, step, phase, since, time}):
a daemon thread rewrites it every `period` seconds from what the loop last reported, so the training
thread does no file I/O. A rank that is stopped, dead or stuck in native code stops refreshing its
file; a rank that waits (for data, or in an all-reduce for a rank that does not come) keeps
refreshing it while its step stays the same.

The same thread is the watchdog: when this rank has been inside one training step for more than
`timeout_s` (dist.timeout_s), it reads every rank's file, names the ranks the step waits for, writes
the message to stderr and to torchrun's error file (so torchrun's summary shows it as the root
cause), and exits with status 1. A job with a hung or dead rank thus fails within dist.timeout_s
plus the poll period, on gloo and NCCL alike. Not watched: a process's first step (torch.compile
and warm-up may take minutes) and the collectives outside a step, which the process group's own
timeout (dist.PG_GRACE_S later) ends.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

FOLDER = "ranks"


def _path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rank{rank}.json")


def read(folder: str, world: int) -> dict[int, dict]:
    """Every rank's last heartbeat that can be read (a rank that never wrote one is absent)."""
    out = {}
    for r in range(world):
        try:
            with open(_path(folder, r)) as f:
                out[r] = json.load(f)
        except (OSError, ValueError):
            pass
    return out


PHASES = {"start": "starting", "data": "waiting for data", "step": "in a training step",
          "checkpoint": "saving a checkpoint", "eval": "evaluating", "done": "finished"}


def _who(r: int, b: dict) -> str:
    return f"rank {r} (host {b['host']}, pid {b['pid']})"


def _doing(b: dict) -> str:
    return PHASES.get(b["phase"], b["phase"])


def diagnose(beats: dict[int, dict], world: int, me: int, now: float, stale_s: float) -> str:
    """One line per rank that others wait for: silent ranks first (stopped, dead, stuck in native
    code), then live ranks that are behind the others or not in a training step."""
    lines = []
    for r in range(world):
        if r not in beats:
            lines.append(f"rank {r} never reported (it did not start, or cannot write to the run folder)")
    silent = [r for r, b in sorted(beats.items()) if r != me and now - b["time"] > stale_s]
    for r in silent:
        b = beats[r]
        lines.append(f"{_who(r, b)} stopped responding {now - b['time']:.0f} s ago "
                     f"(its last report: {_doing(b)} after {b['step']} finished steps): "
                     "it is stopped, dead, or stuck outside Python")
    if not lines:
        live = {r: b for r, b in beats.items() if r != me}
        lowest = min((b["step"] for b in live.values()), default=None)
        for r, b in sorted(live.items()):
            if b["step"] == lowest and (b["phase"] != "step" or lowest < beats.get(me, b)["step"]):
                lines.append(f"{_who(r, b)} has been {_doing(b)} for {now - b['since']:.0f} s, after {b['step']} "
                             "finished steps")
    if not lines:
        lines.append("no other rank stands out: every rank is in the same step (a network or collective problem)")
    return "; ".join(lines)


class Heartbeat:
    def __init__(self, run_dir: str, rank: int, world: int, timeout_s: float, period: Optional[float] = None,
                 on_timeout=None):
        self.folder = os.path.join(run_dir, FOLDER)
        os.makedirs(self.folder, exist_ok=True)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.period = period if period is not None else max(0.5, min(5.0, timeout_s / 6))
        self.stale_s = 3 * self.period + 2
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.phase, self.since = 0, "start", time.time()
        self.first = None  # the step count at this process's first training step (compiles, warms up: not watched)
        self.on_timeout = on_timeout or _fail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imnet-heartbeat", daemon=True)
        self._write()
        self._thread.start()

    def at(self, step: int, phase: str) -> None:
        """The loop reports: `step` optimizer steps are done and it is now in `phase` (a key of PHASES)."""
        if phase != self.phase or step != self.step:
            self.step, self.phase, self.since = step, phase, time.time()
            if self.first is None and phase == "step":
                self.first = step

    def _write(self) -> None:
        rec = {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step, "phase": self.phase,
               "since": self.since, "time": time.time()}
        tmp = _path(self.folder, self.rank) + ".tmp"
        try:  # rename, no fsync (unlike atomic.write): advisory, rewritten every period
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, _path(self.folder, self.rank))
        except OSError:
            pass  # a full or read-only disk must not kill training; the diagnosis then says "never reported"

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._write()
            waited = time.time() - self.since
            watched = self.phase == "step" and self.first is not None and self.step > self.first
            if watched and waited > self.timeout_s and self.world > 1:
                who = diagnose(read(self.folder, self.world), self.world, self.rank, time.time(), self.stale_s)
                self.on_timeout(f"rank {self.rank} (host {self.host}) waited {waited:.0f} s in step {self.step + 1} "
                                f"(dist.timeout_s={self.timeout_s:g}): {who}")
                return

    def explain(self) -> str:
        """For an error a collective raised (a peer closed its connection): the peers on this host whose
        process is gone, else the same diagnosis as the watchdog's."""
        beats = read(self.folder, self.world)
        for _ in range(20):  # a killed process closes its sockets a moment before it is gone: up to 2 s
            dead = [f"{_who(r, b)} is dead (its last report: {_doing(b)} after {b['step']} finished steps)"
                    for r, b in sorted(beats.items())
                    if r != self.rank and b["host"] == self.host and not _alive(b["pid"])]
            if dead:
                return "; ".join(dead)
            time.sleep(0.1)
        return diagnose(beats, self.world, self.rank, time.time(), self.stale_s)

    def close(self, phase: str = "done") -> None:
        self.at(self.step, phase)
        self._stop.set()
        self._thread.join()
        self._write()


def _alive(pid: int) -> bool:
    """Whether process `pid` (on this host) still runs: not gone, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fail(message: str) -> None:
    """Tell the user and torchrun, then exit at once: the training thread is blocked in a collective."""
    from imnet.dist import report_error

    report_error(f"imnet.train: error: {message}")
    os._exit(1)
