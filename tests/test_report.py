"""imnet.report on real run folders made by the trainer's CLI: the table's cells and summary.csv equal
what the runs' metrics.jsonl say, the figures are PNGs matplotlib reads back, unfinished and missing
points are marked, runs that differ outside the grid are warned about, bad input is a one-line error."""

import csv
import os
import shutil
import statistics
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import child_env, metrics, run, single, torchrun
from PIL import Image

from imnet import report
from imnet.log import DONE

SMALL = ["data.name=synthetic", "data.synthetic_size=128", "data.image_size=16", "log.progress=false",
         "model.gn_groups=8", "run.epochs=2", "log.every_steps=4"]


def train(out: str, name: str, norm: str, batch: int, seed: int, *more: str, nproc: int = 1) -> str:
    args = ["imnet.train", *SMALL, f"run.out_dir={out}", f"run.name={name}", f"model.norm={norm}",
            f"data.batch_size={batch}", f"run.seed={seed}", *more]
    run(torchrun(nproc, *args) if nproc > 1 else single(*args))
    return os.path.join(out, name)


def unfinish(folder: str) -> None:
    """What a run killed right after its first validation leaves (train.fit writes DONE only after its last
    step): no DONE, metrics up to that val record."""
    os.remove(os.path.join(folder, DONE))
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        lines = f.readlines()
    first_val = next(i for i, line in enumerate(lines) if '"split": "val"' in line)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(lines[: first_val + 1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep folder (gn x 4/2 images per GPU, bn x 4; gn,4 with 2 seeds, gn,2's seed 1 unfinished, bn,2
    missing) and a 2-process run with another optim.base_lr, all real."""
    out = str(tmp_path_factory.mktemp("runs"))
    jobs = [("sweep/norm=gn,batch_size=4,seed=0", "gn", 4, 0), ("sweep/norm=gn,batch_size=4,seed=1", "gn", 4, 1),
            ("sweep/norm=gn,batch_size=2,seed=0", "gn", 2, 0), ("sweep/norm=gn,batch_size=2,seed=1", "gn", 2, 1),
            ("sweep/norm=bn,batch_size=4,seed=0", "bn", 4, 0)]
    with ThreadPoolExecutor(2) as pool:
        w2 = pool.submit(train, out, "other/world2_lr0.2", "gn", 4, 2, "optim.base_lr=0.2", nproc=2)
        folders = list(pool.map(lambda j: train(out, *j), jobs)) + [w2.result()]
    assert all(os.path.isfile(os.path.join(f, DONE)) for f in folders)  # train.fit wrote it at the end
    unfinish(folders[3])
    return {"out": out, "sweep": os.path.join(out, "sweep"), "folders": folders}


def final_top1(folder: str) -> float:
    return max((r for r in metrics(folder) if r["split"] == "val"), key=lambda r: r["step"])["top1"]


def cells(table: str) -> dict:
    """{(norm, images per GPU): cell text} from table.md."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")]
    return {(r[0], int(b)): c for r in rows[2:] for b, c in zip(rows[0][1:], r[1:])}


def test_report_of_a_sweep_folder(runs, tmp_path):
    sweep, f = runs["sweep"], runs["folders"]
    p = run(single("imnet.report", sweep))
    assert p.stderr == ""  # no warnings: the runs differ only in the grid's keys
    out = os.path.join(sweep, "report")
    with open(os.path.join(out, "table.md"), encoding="utf-8") as fh:
        table = fh.read()
    written = ("table.md", "summary.csv", "curves.png", "error_vs_batch.png")
    assert p.stdout == table + "\nwrote " + ", ".join(os.path.join(out, n) for n in written) + "\n"
    err = {i: 100 * (1 - final_top1(f[i])) for i in range(5)}
    assert cells(table) == {
        ("bn", 4): f"{err[4]:.1f} (n=1)", ("bn", 2): "—",
        ("gn", 4): f"{statistics.mean([err[0], err[1]]):.1f} ± {statistics.stdev([err[0], err[1]]):.1f} (n=2)",
        ("gn", 2): f"{err[2]:.1f} (n=1)*"}
    assert table.splitlines()[0] == "## Final val error (%) by images per GPU (synthetic, small)"
    assert table.splitlines()[1:4] == ["", "| norm | 4 | 2 |", "|---|---:|---:|"]  # largest first, as in the paper
    assert table.splitlines()[-3:] == [
        "Images per GPU = data.batch_size per process; 1 process per run; global batch: 4 (4 per GPU), 2 (2 per GPU).",
        "— no run at this point.",
        f"\\* not counted, unfinished (stopped, failed or still running) or without a result: {f[3]} (no DONE)."]
    with open(os.path.join(out, "summary.csv"), encoding="utf-8") as fh:
        rows = {(r["norm"], int(r["images_per_gpu"])): r for r in csv.DictReader(fh)}
    top = {i: final_top1(f[i]) for i in range(5)}
    top5 = {i: max((r for r in metrics(f[i]) if r["split"] == "val"), key=lambda r: r["step"])["top5"]
            for i in range(5)}
    assert rows[("gn", 4)] == {
        "norm": "gn", "images_per_gpu": "4", "runs": "2", "finished": "2",
        "val_error_mean": f"{statistics.mean([err[0], err[1]]):.4f}",
        "val_error_std": f"{statistics.stdev([err[0], err[1]]):.4f}",
        "val_top1_mean": f"{(top[0] + top[1]) / 2:.6f}", "val_top5_mean": f"{(top5[0] + top5[1]) / 2:.6f}",
        "seeds": "0;1", "processes": "1", "global_batch": "4", "run_folders": f"{f[0]};{f[1]}"}
    assert rows[("gn", 2)]["runs"] == "2" and rows[("gn", 2)]["finished"] == "1"  # the unfinished run is listed
    assert rows[("gn", 2)]["val_error_mean"] == f"{err[2]:.4f}" and rows[("gn", 2)]["val_error_std"] == ""
    assert rows[("gn", 2)]["run_folders"] == f"{f[2]};{f[3]}"
    assert rows[("bn", 2)] == {"norm": "bn", "images_per_gpu": "2", "runs": "0", "finished": "0",
                               **dict.fromkeys(["val_error_mean", "val_error_std", "val_top1_mean", "val_top5_mean",
                                                "seeds", "processes", "global_batch", "run_folders"], "")}
    assert list(rows) == [("bn", 4), ("bn", 2), ("gn", 4), ("gn", 2)]
    import matplotlib.image

    for name in ("curves.png", "error_vs_batch.png"):
        path = os.path.join(out, name)
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 500 and im.size[1] >= 400
        assert matplotlib.image.imread(path).shape[:2] == im.size[::-1]
    # the report folder now inside the sweep holds no run: a second report reads the same 5 runs
    assert [r.folder for r in report.collect([sweep])] == sorted(f[:5])


def test_collect_a_run_folder_and_folders_given_twice(runs):
    f = runs["folders"]
    one = report.collect([f[2]])  # a run folder itself is one run
    assert [(r.norm, r.batch, r.seed, r.done, r.world) for r in one] == [("gn", 2, 0, True, 1)]
    assert one[0].result["top1"] == final_top1(f[2])
    both = report.collect([runs["sweep"], f[2], f[2] + "/"])  # the same folder by other paths: counted once
    assert len(both) == 5
    unfinished = next(r for r in both if r.seed == 1 and r.batch == 2)
    assert not unfinished.done and unfinished.result is None
    assert unfinished.final_val["step"] == 128 // 2  # its first epoch
    assert [(c.norm, c.batch, len(c.runs)) for c in report.summarize(both)] == \
        [("bn", 4, 1), ("bn", 2, 0), ("gn", 4, 2), ("gn", 2, 2)]


def test_warnings_name_the_key_and_the_runs(runs, tmp_path, capsys):
    f, w2 = runs["folders"], runs["folders"][5]  # w2: 2 processes and optim.base_lr=0.2
    assert report.main([runs["sweep"], os.path.dirname(w2), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    ones = ", ".join(sorted(f[:5]))
    assert out.err.splitlines() == [
        f"imnet.report: warning: runs differ in optim.base_lr: 0.1 ({ones}); 0.2 ({w2})",
        f"imnet.report: warning: runs differ in world size (processes per run): 1 ({ones}); 2 ({w2})"]
    assert "processes per run differ: 1, 2 (see the warnings); global batch: 4/8 (4 per GPU), 2 (2 per GPU)." \
        in out.out
    copy = str(tmp_path / "copy" / "gn4")
    shutil.copytree(f[0], copy)
    assert report.check(report.collect([f[0], f[1], copy])) == \
        [f"point norm=gn,batch_size=4,seed=0 has 2 runs, all counted: {f[0]}, {copy}"]


def test_world_size_and_global_batch_in_the_table(runs, tmp_path, capsys):
    w2 = runs["folders"][5]
    assert report.main([w2, "--out", str(tmp_path / "w2")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert "Images per GPU = data.batch_size per process; 2 processes per run; global batch: 8 (4 per GPU)." \
        in out.out.splitlines()
    assert cells(out.out) == {("gn", 4): f"{100 * (1 - final_top1(w2)):.1f} (n=1)"}


@pytest.mark.parametrize("case", ["missing", "empty", "no_runs", "garbled", "not_a_config", "two_dirs"])
def test_bad_input_is_a_one_line_error(case, runs, tmp_path):
    d = str(tmp_path / "d")
    os.makedirs(d)
    if case == "missing":
        d, msg = str(tmp_path / "nope"), f"{tmp_path}/nope: no such file or directory"
    elif case == "empty":
        msg = f"{d}: empty folder, no runs in it"
    elif case == "no_runs":
        os.makedirs(os.path.join(d, "slurm"))
        open(os.path.join(d, "slurm", "job.out"), "w").close()
        msg = f"{d}: no run folders below it (no config.yaml)"
    elif case in ("garbled", "not_a_config"):
        shutil.copytree(runs["folders"][0], os.path.join(d, "r"))
        with open(os.path.join(d, "r", "config.yaml"), "w") as fh:
            fh.write("run: {name: a\n" if case == "garbled" else "- a\n")
        msg = f"{d}/r/config.yaml: " + ("not valid YAML at line 2: expected ',' or '}', but got '<stream end>'"
                                        if case == "garbled" else
                                        "not a run config (needs model.norm, data.batch_size, run.seed)")
    else:
        d, msg = f"{d} {d}", "--out is needed with several DIRs"
    p = run(single("imnet.report", *d.split(" ")), check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == ["usage: imnet.report [-h] [--out OUT] DIR [DIR ...]",
                                     f"imnet.report: error: {msg}"]


def test_without_matplotlib_a_one_line_error_and_nothing_written(runs, tmp_path):
    fake = tmp_path / "fake" / "matplotlib"  # shadows the installed matplotlib: its import fails
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    p = run(single("imnet.report", runs["sweep"], "--out", str(tmp_path / "out")), check=False,
            env=child_env(PYTHONPATH=str(tmp_path / "fake")))
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == 'imnet.report: error: matplotlib is needed for the figures: pip install -e ".[report]"\n'
    assert not os.path.exists(tmp_path / "out")
