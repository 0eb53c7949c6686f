"""Figures and the paper-style table from run folders (Wu & He 2018, Table 2 and Figure 1):

    python -m imnet.report runs/cifar10_batch                       # a sweep folder: writes runs/cifar10_batch/report/
    python -m imnet.report runs/a runs/b runs/other_sweep --out report

A DIR holding `config.yaml` is one run; any other DIR contributes every run folder below it. A run is a
point (model.norm, data.batch_size = images per GPU, i.e. per process, run.seed); its result is the top-1
of its last val record, counted only when the run finished (its folder holds DONE). Written to --out:
  table.md            val error (%) = 100 x (1 - top-1): norms x images per GPU, mean ± sample std over seeds
  summary.csv         one row per (norm, images per GPU): run counts, means, seeds, run folders
  curves.png          train loss and val top-1 against optimizer steps, a column per norm, a line per images per GPU
  error_vs_batch.png  val error against images per GPU (log2, largest on the left), a line per norm
Runs that differ outside the grid (optim.base_lr, data.name, world size, ...) or repeat a point are
named in warnings on stderr: the table would mix them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import get_args

import yaml

from imnet import config
from imnet.log import DONE, METRICS, read_metrics
from imnet.sweep import point_name

CONFIG, RUN_INFO = "config.yaml", "run_info.json"
NORMS = get_args(config.ModelCfg.model_fields["norm"].annotation)  # the table's row order
GRID = ("model.norm", "data.batch_size", "run.seed")
# Keys that name a run or do not change what is trained (prefixes end with "."): never warned about.
IGNORED = ("run.name", "run.out_dir", "data.root", "data.workers", "data.eval_batch_size", "dist.timeout_s",
           "ckpt.", "log.")


class ReportError(ValueError):
    """A problem with the input folders (or a missing matplotlib); the message names the path."""


@dataclass
class Run:
    """One run folder: its config as flat dotted keys, its metrics records and whether it finished."""
    folder: str
    config: dict          # {"optim.base_lr": 0.1, ...}
    records: list[dict]   # metrics.jsonl
    done: bool            # DONE in the folder: the run reached its last step
    world: int | None     # processes (run_info.json; None without one)
    global_batch: int | None

    norm = property(lambda self: self.config["model.norm"])
    batch = property(lambda self: self.config["data.batch_size"])  # images per GPU (per process)
    seed = property(lambda self: self.config["run.seed"])

    @property
    def final_val(self) -> dict | None:
        """The val record with the largest step (the last one logged among equals)."""
        vals = sorted((r for r in self.records if r.get("split") == "val"), key=lambda r: r.get("step", 0))
        return vals[-1] if vals else None

    @property
    def result(self) -> dict | None:
        """The final val record of a finished run; None while unfinished or without a val record."""
        return self.final_val if self.done else None


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def find_runs(path: str) -> list[str]:
    """The run folders `path` stands for: itself when it holds config.yaml, else every one below it."""
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise ReportError(f"{path}: not a folder (give run folders or folders holding them)")
    if os.path.isfile(os.path.join(path, CONFIG)):
        return [path]
    if not os.listdir(path):
        raise ReportError(f"{path}: empty folder, no runs in it")
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if CONFIG in files:
            found.append(root)
            dirs.clear()  # a run folder's checkpoints/, wandb/, ... hold no runs
    if not found:
        raise ReportError(f"{path}: no run folders below it (no {CONFIG})")
    return found


def load_run(folder: str) -> Run:
    path = os.path.join(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ReportError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
    flat = flatten(tree) if isinstance(tree, dict) else {}
    if not all(isinstance(flat.get(k), t) for k, t in zip(GRID, (str, int, int))):
        raise ReportError(f"{path}: not a run config (needs {', '.join(GRID)})")
    try:
        records = read_metrics(folder)
    except (OSError, ValueError) as e:
        raise ReportError(f"{os.path.join(folder, METRICS)}: not JSON lines ({e})") from None
    info, info_path = {}, os.path.join(folder, RUN_INFO)
    if os.path.isfile(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError) as e:
            raise ReportError(f"{info_path}: not JSON ({e})") from None
        if not isinstance(info, dict):
            raise ReportError(f"{info_path}: not a JSON object")
    return Run(folder, flat, records, os.path.isfile(os.path.join(folder, DONE)), info.get("world"),
               info.get("global_batch"))


def collect(dirs: list[str]) -> list[Run]:
    """Every run the DIRs stand for, each folder once (a run given twice, by two paths, is one run)."""
    folders, seen = [], set()
    for d in dirs:
        for f in find_runs(d):
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                folders.append(f)
    return [load_run(f) for f in folders]


def spread(pairs) -> str:
    """[(value, folder)] -> '0.1 (a, b); 0.2 (c)'."""
    groups: dict[str, list[str]] = {}
    for value, folder in pairs:
        groups.setdefault(json.dumps(value), []).append(folder)
    return "; ".join(f"{v} ({', '.join(fs)})" for v, fs in groups.items())


def check(runs: list[Run]) -> list[str]:
    """Warnings: keys outside the grid whose values differ, different world sizes, repeated points."""
    out = []
    keys = sorted({k for r in runs for k in r.config})
    for key in keys:
        if key in GRID or any(key == i or (i.endswith(".") and key.startswith(i)) for i in IGNORED):
            continue
        if len({json.dumps(r.config.get(key, "<missing>")) for r in runs}) > 1:
            out.append(f"runs differ in {key}: {spread((r.config.get(key, '<missing>'), r.folder) for r in runs)}")
    if len({r.world for r in runs}) > 1:
        out.append(f"runs differ in world size (processes per run): {spread((r.world, r.folder) for r in runs)}")
    points: dict[tuple, list[str]] = {}
    for r in runs:
        points.setdefault((r.norm, r.batch, r.seed), []).append(r.folder)
    for (norm, batch, seed), folders in points.items():
        if len(folders) > 1:
            name = point_name({"model.norm": norm, "data.batch_size": batch, "run.seed": seed})
            out.append(f"point {name} has {len(folders)} runs, all counted: {', '.join(folders)}")
    return out


@dataclass
class Cell:
    """One (norm, images per GPU) point of the table with all its runs (seeds); none when missing."""
    norm: str
    batch: int
    runs: list[Run]

    @property
    def counted(self) -> list[Run]:
        return [r for r in self.runs if r.result]

    @property
    def left_out(self) -> list[Run]:
        return [r for r in self.runs if not r.result]

    def errors(self) -> list[float]:
        return [100 * (1 - r.result["top1"]) for r in self.counted]

    def text(self) -> str:
        """'24.1 ± 0.3 (n=3)'; '*' appended when runs are left out; '—' for a point without runs."""
        if not self.runs:
            return "—"
        e, star = self.errors(), "*" if self.left_out else ""
        if len(e) > 1:
            return f"{statistics.mean(e):.1f} ± {statistics.stdev(e):.1f} (n={len(e)}){star}"
        return (f"{e[0]:.1f} (n=1)" if e else "(n=0)") + star


def summarize(runs: list[Run]) -> list[Cell]:
    """Every (norm, images per GPU) of the grid the runs span, norms in NORMS order, batches descending."""
    norms = sorted({r.norm for r in runs}, key=lambda n: (NORMS.index(n), "") if n in NORMS else (len(NORMS), n))
    batches = sorted({r.batch for r in runs}, reverse=True)
    return [Cell(n, b, [r for r in runs if (r.norm, r.batch) == (n, b)]) for n in norms for b in batches]


def table_md(cells: list[Cell]) -> str:
    """The markdown table and its footnotes (what the cells mean, processes, global batch, markers)."""
    runs = [r for c in cells for r in c.runs]
    norms = list(dict.fromkeys(c.norm for c in cells))
    batches = list(dict.fromkeys(c.batch for c in cells))
    what = ", ".join("/".join(sorted({str(r.config.get(k)) for r in runs})) for k in ("data.name", "model.arch"))
    lines = [f"## Final val error (%) by images per GPU ({what})", "",
             "| norm | " + " | ".join(str(b) for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    lines += [f"| {n} | " + " | ".join(c.text() for c in cells if c.norm == n) + " |" for n in norms]
    worlds = sorted({str(r.world or "?") for r in runs})  # "?": no run_info.json
    procs = (f"{worlds[0]} process{'' if worlds[0] == '1' else 'es'} per run" if len(worlds) == 1
             else f"processes per run differ: {', '.join(worlds)} (see the warnings)")
    gb = ", ".join("/".join(sorted({str(r.global_batch or "?") for r in runs if r.batch == b})) + f" ({b} per GPU)"
                   for b in batches)
    lines += ["", "Val error = 100 × (1 − top-1 of the run's last val record), mean ± sample std over seeds "
              + "(n = finished runs).", f"Images per GPU = data.batch_size per process; {procs}; global batch: {gb}."]
    if any(not c.runs for c in cells):
        lines.append("— no run at this point.")
    left = [r for c in cells for r in c.left_out]
    if left:
        why = ", ".join(f"{r.folder} ({'no val record' if r.done else 'no DONE'})" for r in left)
        lines.append(f"\\* not counted, unfinished (stopped, failed or still running) or without a result: {why}.")
    return "\n".join(lines) + "\n"


def summary_rows(cells: list[Cell]) -> list[dict]:
    """summary.csv's rows: val error in %, top-1/top-5 as fractions (as in metrics.jsonl); '' without runs."""
    rows = []
    for c in cells:
        e, n = c.errors(), len(c.counted)
        rows.append({"norm": c.norm, "images_per_gpu": c.batch, "runs": len(c.runs), "finished": n,
                     "val_error_mean": f"{statistics.mean(e):.4f}" if n else "",
                     "val_error_std": f"{statistics.stdev(e):.4f}" if n > 1 else "",
                     "val_top1_mean": f"{statistics.mean(r.result['top1'] for r in c.counted):.6f}" if n else "",
                     "val_top5_mean": f"{statistics.mean(r.result['top5'] for r in c.counted):.6f}" if n else "",
                     "seeds": ";".join(str(s) for s in sorted(r.seed for r in c.runs)),
                     "processes": ";".join(sorted({str(r.world or "?") for r in c.runs})),
                     "global_batch": ";".join(sorted({str(r.global_batch or "?") for r in c.runs})),
                     "run_folders": ";".join(r.folder for r in c.runs)})
    return rows


def write_table(cells: list[Cell], out: str) -> list[str]:
    """table.md and summary.csv in `out`; returns their paths."""
    md, csv_path = os.path.join(out, "table.md"), os.path.join(out, "summary.csv")
    with open(md, "w", encoding="utf-8") as f:
        f.write(table_md(cells))
    rows = summary_rows(cells)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [md, csv_path]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); matplotlib is the [report] extra."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError('matplotlib is needed for the figures: pip install -e ".[report]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_curve(runs: list[Run], split: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over runs of `key` in `split` records, at the steps every one of the runs logged."""
    per_run = [{r["step"]: r[key] for r in run.records if r.get("split") == split and key in r} for run in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    return steps, [statistics.mean(p[s] for p in per_run) for s in steps]


def plot_curves(cells: list[Cell], path: str) -> str:
    """Train loss (top row) and val top-1 (bottom row) against steps: a column per norm, a line per images
    per GPU, each line the mean over that point's runs (seeds)."""
    plt = pyplot()
    norms = list(dict.fromkeys(c.norm for c in cells))
    batches = list(dict.fromkeys(c.batch for c in cells))
    colors = plt.cm.viridis([i / max(len(batches) - 1, 1) for i in range(len(batches))])
    fig, axes = plt.subplots(2, len(norms), figsize=(4.5 * len(norms), 7), squeeze=False, sharex="col")
    for j, norm in enumerate(norms):
        for c in (c for c in cells if c.norm == norm and c.runs):
            label = f"{c.batch} per GPU (n={len(c.runs)}{', *' if c.left_out else ''})"
            for i, (split, key, scale) in enumerate((("train", "loss", 1), ("val", "top1", 100))):
                steps, ys = mean_curve(c.runs, split, key)
                axes[i][j].plot(steps, [y * scale for y in ys], color=colors[batches.index(c.batch)],
                                marker="." if split == "val" else None, label=label)
        axes[0][j].set_title(norm)
        axes[0][j].legend(fontsize=8)
        axes[1][j].set_xlabel("optimizer step")
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("val top-1 (%)")
    fig.suptitle("Mean over seeds at the steps all of a point's runs logged (* includes unfinished runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_batch(cells: list[Cell], path: str) -> str:
    """Final val error against images per GPU (log2 axis, largest on the left as in the paper's Figure 1),
    a line per norm: the mean over finished runs, bars from the lowest to the highest run."""
    plt = pyplot()
    batches = list(dict.fromkeys(c.batch for c in cells))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for norm in dict.fromkeys(c.norm for c in cells):
        pts = [(c.batch, c.errors()) for c in cells if c.norm == norm and c.errors()]
        if not pts:
            continue
        means = [statistics.mean(e) for _, e in pts]
        ax.errorbar([b for b, _ in pts], means, yerr=[[m - min(e) for m, (_, e) in zip(means, pts)],
                                                      [max(e) - m for m, (_, e) in zip(means, pts)]],
                    marker="o", capsize=3, label=norm)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlim(max(batches) * 1.4, min(batches) / 1.4)  # largest on the left
    ax.set_xlabel("images per GPU")
    ax.set_ylabel("val error (%)")
    ax.set_title("Final val error: mean over seeds, bars min to max")
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="imnet.report", description="Figures and the paper-style table from run folders.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="a run folder, a sweep folder, or any folder holding runs")
    p.add_argument("--out", help="where to write (default: DIR/report; needed with several DIRs)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.out is None and len(a.dirs) > 1:
        p.error("--out is needed with several DIRs")
    try:
        runs = collect(a.dirs)
    except ReportError as e:
        p.error(str(e))
    try:
        pyplot()  # before anything is written: no table without its figures
    except ReportError as e:
        p.exit(1, f"{p.prog}: error: {e}\n")
    for w in check(runs):
        print(f"{p.prog}: warning: {w}", file=sys.stderr, flush=True)
    cells = summarize(runs)
    out = a.out or os.path.join(a.dirs[0], "report")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {out}: {e.strerror}")
    paths = write_table(cells, out) + [plot_curves(cells, os.path.join(out, "curves.png")),
                                       plot_error_vs_batch(cells, os.path.join(out, "error_vs_batch.png"))]
    print(table_md(cells), flush=True)
    print("wrote " + ", ".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
