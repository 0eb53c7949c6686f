"""Run every point of a sweep on this machine, one after another, each through torchrun:

    python -m imnet.sweep configs/sweeps/digits_batch.yaml --nproc 2
    python -m imnet.sweep FILE --dry-run                       # list the points and their commands
    python -m imnet.sweep FILE --only model.norm=gn [key.sub=value ...]

A sweep file (the same files `launch/submit.py --sweep` takes) holds `name`, an optional `base`
config (a path relative to the sweep file works), optionally `set: {key.sub: value}` (applied to
every point), `grid: {key.sub: [values]}` and optionally `exclude: [{key.sub: value, ...}]`
(combinations left out); every other combination is a point, run in
`<run.out_dir>/<name>/<point>` (e.g. `norm=gn,batch_size=2,seed=0`). Keys given on the command line
apply to every point (and win over `set:`).

Resumable: a point whose run ended (its run folder holds `DONE`, written by the trainer at the end
of the run) is skipped; a point that was killed resumes from its checkpoint (ckpt.resume=auto);
a point that fails is reported and the next one runs. Exit status 0 only when every point is done.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from imnet import config
from imnet.dist import EXIT_STOPPED
from imnet.log import DONE


@dataclass
class Sweep:
    name: str
    base: str | None      # the base config file, or None
    grid: dict            # {dotted key: [values]}
    path: str
    exclude: list = field(default_factory=list)  # [{dotted key: value}]: a point matching one is left out
    fixed: dict = field(default_factory=dict)    # `set:` {dotted key: value} for every point

    def points(self) -> list[dict]:
        """Every combination of the grid's values, in the file's key order (the last key varies fastest),
        less the excluded ones."""
        points = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]
        return [p for p in points if not any(all(p[k] == v for k, v in ex.items()) for ex in self.exclude)]


def load_sweep(path: str) -> Sweep:
    """A sweep file -> Sweep; any problem is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"--sweep: no such file {path!r}")
    doc = config.read_yaml(path, "--sweep")  # the configs' loader: duplicate keys and tags are errors
    doc = {} if doc is None else doc
    if not isinstance(doc, dict) or set(doc) - {"name", "base", "set", "grid", "exclude"} \
            or not isinstance(doc.get("grid"), dict) or not doc["grid"]:
        raise ValueError(f"--sweep {path}: expected a mapping with `grid: {{key.sub: [values]}}` and optional "
                         f"`base: CONFIG`, `name: NAME`, `set: {{key.sub: value}}`, `exclude: [{{key.sub: value}}]` "
                         f"(got keys {sorted(doc) if isinstance(doc, dict) else doc})")
    grid = {k: v if isinstance(v, list) else [v] for k, v in doc["grid"].items()}
    for k, v in grid.items():
        if not v:
            raise ValueError(f"--sweep {path}: grid.{k} has no values")
        if k == "run.name":
            raise ValueError(f"--sweep {path}: grid.run.name: each point's run folder is named after its values")
    exclude = doc.get("exclude") or []
    for ex in exclude if isinstance(exclude, list) else [exclude]:
        if not isinstance(ex, dict) or not ex or set(ex) - set(grid) or any(v not in grid[k] for k, v in ex.items()):
            raise ValueError(f"--sweep {path}: exclude: {ex!r} is not a mapping of grid keys to grid values")
    fixed = doc.get("set") or {}
    if not isinstance(fixed, dict) or set(fixed) & set(grid):
        raise ValueError(f"--sweep {path}: set: must map keys that are not grid keys to one value each")
    base = doc.get("base")
    if base and not os.path.isfile(base) and os.path.isfile(os.path.join(os.path.dirname(path), base)):
        base = os.path.join(os.path.dirname(path), base)
    sw = Sweep(str(doc.get("name") or os.path.splitext(os.path.basename(path))[0]), base, grid, path, exclude, fixed)
    if not sw.points():
        raise ValueError(f"--sweep {path}: exclude leaves no point")
    return sw


def point_name(point: dict) -> str:
    """{"model.norm": "gn", "data.batch_size": 2} -> "norm=gn,batch_size=2" (full keys where short ones clash)."""
    short = [k.rsplit(".", 1)[-1] for k in point]
    keys = [s if short.count(s) == 1 else k for s, k in zip(short, point)]
    def fmt(v) -> str:
        return json.dumps(v) if isinstance(v, (bool, list, dict)) or v is None else str(v)

    return ",".join(f"{k}={fmt(v)}".replace(os.sep, "_") for k, v in zip(keys, point.values()))


def point_overrides(sweep: Sweep, point: dict, cli: list[str]) -> list[str]:
    """The dotted overrides that make `point` a run of `sweep`: the sweep's `set:`, then the command
    line's keys (they win over `set:`), then the point's values and its run.name."""
    def fmt(items) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in items]

    return fmt(sweep.fixed.items()) + list(cli) + fmt(point.items()) + \
        [f"run.name={json.dumps(sweep.name + '/' + point_name(point))}"]


def resolve_points(sweep: Sweep, config_path: str | None, overrides: list[str]) -> list[tuple[dict, config.Config]]:
    """[(point, validated Config)] for every point; a bad point is a ConfigError naming it."""
    clash = sorted({o.partition("=")[0] for o in overrides} & (set(sweep.grid) | {"run.name"}))
    if clash:
        raise ValueError(f"--sweep {sweep.path}: {', '.join(clash)} set by the sweep, not also on the command line")
    if sweep.base and config_path:
        raise ValueError(f"--config {config_path} and the sweep's base: {sweep.base}: give one")
    out = []
    for point in sweep.points():
        try:
            out.append((point, config.load(sweep.base or config_path, point_overrides(sweep, point, overrides))))
        except config.ConfigError as e:
            raise config.ConfigError(f"sweep point {point_name(point)}: {e}") from None
    return out


def matches(point: dict, only: list[str]) -> bool:
    """--only key=value filters (YAML-parsed values): a point matches when every filter holds."""
    for item in only:
        key, _, raw = item.partition("=")
        if key not in point:
            raise ValueError(f"--only {item}: {key} is not a grid key (grid: {', '.join(point)})")
        if point[key] != config.parse_overrides([f"x={raw}"])["x"]:
            return False
    return True


def run_dir(cfg: config.Config) -> str:
    return os.path.join(cfg.run.out_dir, cfg.run.name)


def is_done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, DONE))


def command(nproc: int, config_path: str | None, overrides: list[str]) -> list[str]:
    """torchrun on this machine (a free port from the store: several sweeps can share a host)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "imnet.train"]
    if config_path:
        cmd += ["--config", config_path]
    return cmd + overrides


def _wait(proc: subprocess.Popen, note: str) -> bool:
    """Wait for the point's torchrun; whether Ctrl-C (SIGINT) came meanwhile. The first one only notes it
    (torchrun got it too: its workers checkpoint and stop, and the wait goes on), a second kills the
    point. A handler rather than KeyboardInterrupt: a signal taken by another thread of this process
    would not interrupt the wait, and the KeyboardInterrupt would surface after it, anywhere."""
    seen: list[int] = []

    def on_sigint(signum, frame):
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)
        print(note, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(seen)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imnet.sweep", description="Run every point of a sweep on this machine.")
    p.add_argument("sweep", help="sweep YAML: name, base, grid: {key.sub: [values]}")
    p.add_argument("--config", help="base config when the sweep file names none")
    p.add_argument("--nproc", type=int, default=1, help="processes per point (torchrun --nproc_per_node)")
    p.add_argument("--only", action="append", default=[], metavar="key=value",
                   help="run only the points with this grid value (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the points, their state and commands; run nothing")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every point")
    a = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # key=value before or after options
    if a.nproc < 1:
        p.error(f"--nproc must be at least 1 (got {a.nproc})")
    try:
        sweep = load_sweep(a.sweep)
        points = [(pt, cfg) for pt, cfg in resolve_points(sweep, a.config, a.overrides) if matches(pt, a.only)]
    except (config.ConfigError, ValueError) as e:
        p.error(str(e))
    if not points:
        p.error(f"--only {' '.join(a.only)}: no point of {sweep.path} matches")
    base = sweep.base or a.config
    total = len(points)
    print(f"sweep {sweep.name}: {total} point{'s' * (total != 1)}, {a.nproc} process(es) each, run folders in "
          f"{os.path.join(points[0][1].run.out_dir, sweep.name)}", flush=True)
    done, failed, t_sweep = [], [], time.monotonic()
    for i, (pt, cfg) in enumerate(points, 1):
        name, folder = point_name(pt), run_dir(cfg)
        cmd = command(a.nproc, base, point_overrides(sweep, pt, a.overrides))
        if is_done(folder):
            print(f"[{i}/{total}] {name}: done already, skipped", flush=True)
            done.append(name)
            continue
        state = "resuming" if os.path.isdir(os.path.join(folder, "checkpoints")) else "starting"
        if a.dry_run:
            print(f"[{i}/{total}] {name}: would run ({state}): {shlex.join(cmd)}", flush=True)
            continue
        print(f"[{i}/{total}] {name}: {state}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd)
        interrupted = _wait(proc, f"[{i}/{total}] {name}: interrupted; waiting for its checkpoint (Ctrl-C again: "
                                  "kill it)")
        if interrupted:
            print(f"[{i}/{total}] {name}: run the same command again to go on", flush=True)
            return 130
        rc = proc.returncode
        took = time.monotonic() - t0
        if rc == 0 and is_done(folder):
            print(f"[{i}/{total}] {name}: done in {took:.0f} s", flush=True)
            done.append(name)
        else:
            why = ("stopped by a signal" if rc == EXIT_STOPPED else f"exit status {rc}") if rc else \
                "stopped before its last step"
            print(f"[{i}/{total}] {name}: failed ({why}) after {took:.0f} s; see {folder}", flush=True)
            failed.append(name)
            if rc < 0 or rc in (EXIT_STOPPED, 130, 137, 143):  # the sweep itself was interrupted: stop here
                break
    if a.dry_run:
        return 0
    left = total - len(done) - len(failed)
    print(f"sweep {sweep.name}: {len(done)} of {total} points done, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + (f", {left} not run" if left else "")
          + f", {time.monotonic() - t_sweep:.0f} s", flush=True)
    return 0 if len(done) == total else 1


if __name__ == "__main__":
    sys.exit(main())
