"""python -m imnet.sweep: grid expansion, point names and learning rates, and real sweeps of 2-process
runs on digits: a point killed and resumed, a finished point skipped, a failing point reported."""

import json
import os
import re
import subprocess
import time

import pytest
import yaml
from conftest import ROOT, child_env, isolated, kill_tree, metrics, run, single

from imnet import schedule, sweep

SWEEP = ["-m", "imnet.sweep"]


DIGITS_GN = os.path.join(ROOT, "configs", "digits_gn.yaml")


def write_sweep(tmp_path, grid, name="s4", base=DIGITS_GN):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "grid": grid}, sort_keys=False))
    return str(path)


def test_grid_points_names_and_learning_rates(tmp_path):
    sw = sweep.load_sweep(write_sweep(tmp_path, {"model.norm": ["gn", "bn"], "data.batch_size": [32, 2],
                                                 "run.seed": [0, 1]}))
    points = sw.points()
    assert len(points) == 8 and points[0] == {"model.norm": "gn", "data.batch_size": 32, "run.seed": 0}
    assert points[-1] == {"model.norm": "bn", "data.batch_size": 2, "run.seed": 1}
    assert sweep.point_name(points[1]) == "norm=gn,batch_size=32,seed=1"
    resolved = sweep.resolve_points(sw, None, [f"run.out_dir={tmp_path}"])
    for point, cfg in resolved:
        assert cfg.model.norm == point["model.norm"] and cfg.data.batch_size == point["data.batch_size"]
        assert cfg.run.name == "s4/" + sweep.point_name(point)
        assert cfg.run.epochs == 8  # the base config's
    # the learning rate follows the global batch: base_lr 0.4 per 256 images, 2 processes
    lrs = {p["data.batch_size"]: schedule.peak_lr(c.optim.base_lr, c.data.batch_size * 2, c.optim.lr_scaling)
           for p, c in resolved}
    assert lrs == {32: pytest.approx(0.1), 2: pytest.approx(0.00625)}


def test_clashing_names_use_full_keys_and_shipped_digits_sweep_validates():
    assert sweep.point_name({"model.norm": "gn", "optim.norm": 1}) == "model.norm=gn,optim.norm=1"
    sw = sweep.load_sweep(os.path.join(ROOT, "configs", "sweeps", "digits_batch.yaml"))
    points = sweep.resolve_points(sw, None, [])
    assert len(points) == 34  # 3 norms x 6 batch sizes x 2 seeds, less BN at 1 image (excluded)
    assert {(p["model.norm"], p["data.batch_size"]) for p, _ in points} == \
        {(n, b) for n in ("gn", "bn", "syncbn") for b in (32, 16, 8, 4, 2, 1)} - {("bn", 1)}
    assert {c.run.epochs for _, c in points} == {4}  # the sweep's `set:`
    # the command line wins over `set:`
    assert {c.run.epochs for _, c in sweep.resolve_points(sw, None, ["run.epochs=2"])} == {2}


BAD = [
    (["--only", "model.arch=small"], "--only model.arch=small: model.arch is not a grid key"),
    (["--only", "model.norm=ln"], "--only model.norm=ln: no point of"),
    (["model.norm=bn"], "model.norm set by the sweep, not also on the command line"),
    (["optim.lr=0.1"], "sweep point norm=gn,batch_size=32: optim.lr: unknown key"),
    (["--nproc", "0"], "--nproc must be at least 1 (got 0)"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_are_errors_before_anything_runs(tmp_path, args, message):
    path = write_sweep(tmp_path, {"model.norm": ["gn", "bn"], "data.batch_size": [32]})
    p = run(single(*SWEEP[1:], path, f"run.out_dir={tmp_path}/runs", *args), check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(tmp_path / "runs")


def test_missing_sweep_file_is_an_error(tmp_path):
    p = run(single(*SWEEP[1:], str(tmp_path / "none.yaml")), check=False)
    assert p.returncode == 2 and f"--sweep: no such file '{tmp_path}/none.yaml'" in p.stderr


def test_dry_run_lists_points_states_and_commands(tmp_path):
    path = write_sweep(tmp_path, {"model.norm": ["gn", "bn"], "data.batch_size": [32]})
    out = run(single(*SWEEP[1:], path, "--nproc", "2", "--dry-run", f"run.out_dir={tmp_path}")).stdout
    assert f"sweep s4: 2 points, 2 process(es) each, run folders in {tmp_path}/s4" in out
    line = re.search(r"\[1/2\] norm=gn,batch_size=32: would run \(starting\): (.*)", out).group(1)
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m imnet.train --config" in line
    assert "'run.name=\"s4/norm=gn,batch_size=32\"'" in line
    assert not os.path.exists(tmp_path / "s4")


def _sweep_cmd(path, tmp_path, *more):
    return isolated(single(*SWEEP[1:], path, "--nproc", "2", f"run.out_dir={tmp_path}", "log.progress=false",
                           "run.epochs=1", "optim.warmup_epochs=0", "ckpt.every_steps=10", "log.every_steps=5", *more))


@pytest.mark.slow
def test_sweep_end_to_end_kill_resume_skip(tmp_path):
    """4 points of 2-process digits runs; the second is SIGKILLed (the whole sweep with it) after its
    first checkpoint; rerunning the sweep skips the finished point, resumes the killed one from its
    checkpoint (one trajectory in its metrics.jsonl) and runs the rest."""
    path = write_sweep(tmp_path, {"model.norm": ["gn", "bn"], "data.batch_size": [32, 8]})
    names = ["norm=gn,batch_size=32", "norm=gn,batch_size=8", "norm=bn,batch_size=32", "norm=bn,batch_size=8"]
    second = tmp_path / "s4" / names[1]
    p = subprocess.Popen(_sweep_cmd(path, tmp_path), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 200
    while not os.path.exists(second / "checkpoints" / "latest"):
        assert p.poll() is None and time.monotonic() < deadline, "the second point never checkpointed"
        time.sleep(0.02)
    kill_tree(p.pid)
    p.wait()
    assert not os.path.exists(second / sweep.DONE) and os.path.exists(tmp_path / "s4" / names[0] / sweep.DONE)
    killed_at = json.loads(open(second / "metrics.jsonl").readlines()[-1])["step"]

    out = run(_sweep_cmd(path, tmp_path), timeout=400).stdout
    assert f"[1/4] {names[0]}: done already, skipped" in out
    assert f"[2/4] {names[1]}: resuming" in out and f"[2/4] {names[1]}: done in" in out
    assert re.search(r"resumed from \S+ckpt_000000\d\d.pt at step \d+ ", out), out
    for i, name in enumerate(names[2:], 3):
        assert f"[{i}/4] {name}: starting" in out and f"[{i}/4] {name}: done in" in out
    assert out.rstrip().splitlines()[-1].startswith("sweep s4: 4 of 4 points done, 0 failed, ")

    steps_per_epoch = {32: 22, 8: 89}  # 1437 digits / (2 ranks x batch)
    for name in names:
        folder = tmp_path / "s4" / name
        batch = int(name.rsplit("=", 1)[1])
        done = json.load(open(folder / sweep.DONE))
        assert done["step"] == steps_per_epoch[batch] and done["n"] == 360
        train = [r["step"] for r in metrics(folder) if r["split"] == "train"]
        assert train == list(range(5, steps_per_epoch[batch] + 1, 5))  # one trajectory, nothing twice
        info = json.load(open(folder / "run_info.json"))
        assert info["world"] == 2 and info["peak_lr"] == pytest.approx(0.4 * 2 * batch / 256)
        assert yaml.safe_load(open(folder / "config.yaml"))["run"]["name"] == f"s4/{name}"
    assert killed_at >= 5  # the kill landed after some training


@pytest.mark.slow
def test_a_failing_point_is_reported_and_the_others_run(tmp_path):
    path = write_sweep(tmp_path, {"data.batch_size": [2000, 32]}, name="f2")
    p = run(_sweep_cmd(path, tmp_path, "run.max_steps=3"), check=False, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "[1/2] batch_size=2000: failed (exit status 1)" in p.stdout
    assert "data.batch_size: 2000 x 2 ranks is more than the 1437 training images" in p.stderr
    assert "[2/2] batch_size=32: done in" in p.stdout
    assert "sweep f2: 1 of 2 points done, 1 failed (batch_size=2000)" in p.stdout
    assert os.path.exists(tmp_path / "f2" / "batch_size=32" / sweep.DONE)


def test_only_filters_points(tmp_path):
    path = write_sweep(tmp_path, {"model.norm": ["gn", "bn"], "data.batch_size": [32, 2]})
    out = run(single(*SWEEP[1:], path, "--dry-run", "--only", "model.norm=bn", "--only", "data.batch_size=2",
                     f"run.out_dir={tmp_path}")).stdout
    assert "sweep s4: 1 point, 1 process(es) each" in out and "[1/1] norm=bn,batch_size=2: would run" in out


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_the_rerun_goes_on(tmp_path):
    """SIGINT to the sweep's process group (what Ctrl-C in a terminal sends): the point checkpoints, no
    traceback, exit 130, the interrupted point is not done, and the same command then finishes it."""
    import signal

    path = write_sweep(tmp_path, {"data.batch_size": [8]}, name="c1")
    cmd = _sweep_cmd(path, tmp_path, "run.max_steps=400")
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    folder = tmp_path / "c1" / "batch_size=8"
    deadline = time.monotonic() + 200
    while not (os.path.exists(folder / "metrics.jsonl") and metrics(folder)):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (out, err)
    assert "[1/1] batch_size=8: interrupted; waiting for its checkpoint (Ctrl-C again: kill it)" in out
    assert "[1/1] batch_size=8: run the same command again to go on" in out
    assert "stopped by signal at step" in out  # torchrun passed the SIGINT on: the workers checkpointed
    assert 'imnet/sweep.py", line' not in err  # no traceback of the sweep's own (torchrun's workers may print theirs)
    assert not os.path.exists(folder / sweep.DONE)
    out = run(cmd, timeout=300).stdout
    assert "[1/1] batch_size=8: done in" in out and json.load(open(folder / sweep.DONE))["step"] == 89


SWEEP_FILE_ERRORS = [
    ({"grid": {"model.norm": ["gn"]}, "exclude": [{"model.arch": "small"}]},
     "exclude: {'model.arch': 'small'} is not a mapping of grid keys to grid values"),
    ({"grid": {"model.norm": ["gn"]}, "exclude": [{"model.norm": "gn"}]}, "exclude leaves no point"),
    ({"grid": {"model.norm": ["gn"]}, "set": {"model.norm": "bn"}},
     "set: must map keys that are not grid keys to one value each"),
    ({"grid": {"model.norm": []}}, "grid.model.norm has no values"),
    ({"grid": {"run.name": ["a"]}}, "grid.run.name: each point's run folder is named after its values"),
    ({"grid": {"model.norm": ["gn"]}, "seeds": [1]}, "expected a mapping with `grid: {key.sub: [values]}`"),
]


@pytest.mark.parametrize("doc,message", SWEEP_FILE_ERRORS, ids=[m[:30] for _, m in SWEEP_FILE_ERRORS])
def test_sweep_file_errors_name_the_file_and_the_problem(tmp_path, doc, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError) as e:
        sweep.load_sweep(str(path))
    assert str(e.value).startswith(f"--sweep {path}: ") and message in str(e.value)
    (tmp_path / "syntax.yaml").write_text("grid: {model.norm: [gn\n")
    with pytest.raises(ValueError, match=f"--sweep {tmp_path}/syntax.yaml: not valid YAML"):
        sweep.load_sweep(str(tmp_path / "syntax.yaml"))


def test_a_duplicate_key_in_a_sweep_file_names_its_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: d\ngrid:\n  model.norm: [gn, bn]\n  data.batch_size: [2]\n  model.norm: [gn]\n")
    with pytest.raises(ValueError) as e:
        sweep.load_sweep(str(path))
    assert str(e.value) == f"--sweep {path}: line 5: duplicate key 'model.norm' (first at line 3)"


def test_a_python_tag_in_a_sweep_file_is_refused(tmp_path):
    path, flag = tmp_path / "tag.yaml", tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system [\"touch {flag}\"]\ngrid: {{model.norm: [gn]}}\n")
    with pytest.raises(ValueError) as e:
        sweep.load_sweep(str(path))
    assert str(e.value) == f"--sweep {path}: line 1: unsafe/unsupported YAML tag '!!python/object/apply:os.system'"
    assert not flag.exists()


def test_a_sweep_name_that_is_no_folder_name_is_refused(tmp_path):
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump({"name": "a\nb", "base": os.path.join(ROOT, "configs", "digits_gn.yaml"),
                                    "grid": {"model.norm": ["gn"]}}))
    sw = sweep.load_sweep(str(path))
    with pytest.raises(ValueError) as e:
        sweep.resolve_points(sw, None, [f"run.out_dir={tmp_path}"])
    assert str(e.value) == ("sweep point norm=gn: run.name: 'a\\nb/norm=gn' contains a control character "
                            "(newline, tab, ...)")
