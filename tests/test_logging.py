"""The sinks: W&B offline runs read back from their run files (imnet.wandb_file), one W&B run across a
SIGKILL and a restart, finish on a signal stop and on an error, no network from an offline run,
TensorBoard event files read back, and metrics.jsonl's data wait and throughput windows."""

import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import ROOT, child_env, isolated, kill_tree, metrics, run, single, torchrun

from imnet import log, wandb_file

TRAIN_KEYS = {"train/loss", "train/top1", "train/lr", "train/img_per_s", "train/data_wait", "train/skipped"}
VAL_KEYS = {"val/loss", "val/top1", "val/top5"}


def wandb_env(tmp_path, **extra):
    # no credentials, no user settings: what a compute node without W&B set up has
    env = child_env(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "home" / ".config" / "wandb"),
                    WANDB_CACHE_DIR=str(tmp_path / "home" / ".cache"))
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_ENTITY"):
        env.pop(k, None)
    return {**env, **extra}


def run_files(run_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))


def kinds(path) -> dict:
    """{record type: [records]} of a run file."""
    out: dict = {}
    for rec in wandb_file.records(path):
        out.setdefault(rec.WhichOneof("record_type"), []).append(rec)
    return out


def summary(path) -> dict:
    s = {}
    for rec in kinds(path).get("summary", []):
        for item in rec.summary.update:
            s[".".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return s


def test_offline_run_reads_back_with_keys_step_metric_config_and_summary(tmp_path, small_run):
    p = run(single("imnet.train", *small_run("wb", "log.wandb=offline", "log.wandb_tags=[study]", "log.every_steps=4",
                                            "run.epochs=2", "log.tensorboard=true")), env=wandb_env(tmp_path))
    run_dir = tmp_path / "wb"
    run_id = open(run_dir / log.WANDB_ID).read().strip()
    [path] = run_files(run_dir)
    assert path.endswith(f"-{run_id}/run-{run_id}.wandb")
    # the last line: how to upload it
    assert p.stdout.rstrip().splitlines()[-1] == \
        f"W&B run {run_id} is offline; upload it with: wandb sync {run_dir}/wandb/offline-run-*-{run_id}"

    recs = kinds(path)
    [r] = recs["run"]
    assert r.run.run_id == run_id and r.run.project == "imnet" and r.run.job_type == "train"
    assert r.run.run_group == "wb" and r.run.display_name == "wb"
    assert list(r.run.tags) == ["norm=gn", "img_per_gpu=8", "data=synthetic", "arch=small", "world=1", "study"]
    cfg = {i.key: json.loads(i.value_json) for i in r.run.config.update}
    resolved = yaml.safe_load(open(run_dir / "config.yaml"))
    for section in ("run", "data", "model", "optim", "log"):
        assert cfg[section] == resolved[section]
    info = json.load(open(run_dir / "run_info.json"))
    assert (cfg["world"], cfg["global_batch"], cfg["peak_lr"]) == (1, 8, pytest.approx(0.1 * 8 / 256))
    assert cfg["git_commit"] == info["git_commit"]

    metric = {m.metric.glob_name or m.metric.name: m.metric.step_metric for m in recs["metric"]}
    assert metric == {"trainer/step": "", "train/*": "trainer/step", "val/*": "trainer/step", "sys/*": "trainer/step"}

    # every history row is one imnet step, with the same numbers as metrics.jsonl
    rows = wandb_file.history(path)
    jsonl = metrics(run_dir)
    by_step: dict = {}
    for rec in jsonl:
        by_step.setdefault(rec["step"], {}).update({f"{rec['split']}/{k}": v for k, v in rec.items()})
    assert [row["trainer/step"] for row in rows] == sorted(by_step) == [row["_step"] for row in rows]
    for row in rows:
        want = by_step[row["trainer/step"]]
        keys = {k for k in row if k.startswith(("train/", "val/"))}
        assert keys == {k for k in want if k in TRAIN_KEYS | VAL_KEYS}
        for k in keys:
            assert row[k] == pytest.approx(float(want[k]))
    assert {k for row in rows for k in row} >= TRAIN_KEYS | VAL_KEYS
    assert not any(k.startswith("sys/") for row in rows for k in row)  # peak memory: GPUs only

    val = [r for r in jsonl if r["split"] == "val"]
    ips = sorted(r["img_per_s"] for r in jsonl if r["split"] == "train")
    s = summary(path)
    assert s["val/final_top1"] == pytest.approx(val[-1]["top1"])
    assert s["val/final_top5"] == pytest.approx(val[-1]["top5"])
    assert s["val/best_top1"] == pytest.approx(max(r["top1"] for r in val))
    assert s["train/median_img_per_s"] == pytest.approx(ips[len(ips) // 2] if len(ips) % 2 else
                                                        (ips[len(ips) // 2 - 1] + ips[len(ips) // 2]) / 2)
    [ex] = recs["exit"]
    assert ex.exit.exit_code == 0 and "preempting" not in recs

    # TensorBoard: the same scalars as event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == TRAIN_KEYS | VAL_KEYS
    for key in TRAIN_KEYS | VAL_KEYS:
        events = acc.Scalars(key)
        want = [(s, v[key]) for s, v in sorted(by_step.items()) if key in v]
        assert [e.step for e in events] == [s for s, _ in want]
        assert [e.value for e in events] == pytest.approx([float(v) for _, v in want], rel=1e-6)


def test_offline_run_opens_no_network_socket(tmp_path, small_run):
    """strace every process of an offline run: sockets are AF_UNIX (W&B's service) or AF_NETLINK
    (interface lists, kernel-local); none is AF_INET/AF_INET6, and nothing connects anywhere else."""
    trace = tmp_path / "trace"
    run(["strace", "-f", "-qq", "-e", "trace=socket,connect", "-o", str(trace), *single(
        "imnet.train", *small_run("net", "log.wandb=offline", "run.max_steps=3"))], env=wandb_env(tmp_path))
    lines = open(trace).read().splitlines()
    domains = {m.group(1) for line in lines if (m := re.search(r"socket\((AF_\w+)", line))}
    assert "AF_UNIX" in domains and domains <= {"AF_UNIX", "AF_NETLINK"}, domains
    connects = [line for line in lines if " connect(" in line]
    assert connects and all("sa_family=AF_UNIX" in line for line in connects), \
        [c for c in connects if "AF_UNIX" not in c]


def test_online_without_credentials_is_a_clear_error_at_start(tmp_path, small_run):
    t = time.monotonic()
    p = run(isolated(single("imnet.train", *small_run("on", "log.wandb=online"))), env=wandb_env(tmp_path), check=False)
    assert p.returncode == 1, p.stderr
    assert "imnet.train: error: log.wandb=online: W&B cannot start: No API key configured" in p.stderr
    assert "use log.wandb=offline and `wandb sync` later" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t < 120  # not a hang
    assert not os.path.exists(tmp_path / "on" / log.DONE)


def test_signal_stop_marks_the_run_preempted_and_an_error_finishes_it_with_exit_code_1(tmp_path, small_run):
    cmd = single("imnet.train", *small_run("sig", "log.wandb=offline", "run.epochs=50", "log.every_steps=1"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=wandb_env(tmp_path, WANDB_PROJECT="study"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (os.path.exists(tmp_path / "sig" / "metrics.jsonl") and metrics(tmp_path / "sig")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "stopped by signal at step" in out
    recs = kinds(run_files(tmp_path / "sig")[0])
    assert len(recs["preempting"]) == 1 and recs["exit"][0].exit.exit_code == 128 + signal.SIGTERM
    assert recs["run"][0].run.project == "study"  # log.wandb_project unset: WANDB_PROJECT keeps its meaning
    assert not os.path.exists(tmp_path / "sig" / log.DONE)

    p = run(single("imnet.train", *small_run("nan", "log.wandb=offline", "optim.base_lr=1e30", "dist.max_nonfinite=2")),
            env=wandb_env(tmp_path), check=False)
    assert p.returncode == 1 and "FloatingPointError: 2 non-finite losses in a row" in p.stderr
    recs = kinds(run_files(tmp_path / "nan")[0])
    assert recs["exit"][0].exit.exit_code == 1 and "preempting" not in recs
    run_id = open(tmp_path / "nan" / log.WANDB_ID).read().strip()
    assert p.stdout.rstrip().splitlines()[-1].startswith(f"W&B run {run_id} is offline; upload it with: wandb sync ")


def test_wandb_mode_disabled_keeps_its_meaning(tmp_path, small_run):
    p = run(single("imnet.train", *small_run("off", "log.wandb=offline", "run.max_steps=2")),
            env=wandb_env(tmp_path, WANDB_MODE="disabled"))
    assert run_files(tmp_path / "off") == [] and "wandb sync" not in p.stdout
    assert json.load(open(tmp_path / "off" / log.DONE))["step"] == 2


@pytest.mark.slow
def test_sigkill_and_restart_continue_one_wandb_run_without_lost_or_repeated_steps(tmp_path):
    """2 ranks on digits; SIGKILL every process after the checkpoint at step 10 and some logged steps
    past it (W&B's service may not have written them, or any, to its run file); the rerun resumes
    from step 10, keeps the W&B id, and sends W&B every step it lacks, from metrics.jsonl and the
    replay: over both attempts' run files every step appears exactly once."""
    args = ["imnet.train", "--config", "configs/digits_gn.yaml", f"run.out_dir={tmp_path}", "run.name=k",
            "log.progress=false", "run.epochs=3", "log.every_steps=1", "ckpt.every_steps=10", "log.wandb=offline",
            "log.tensorboard=true"]
    run_dir = tmp_path / "k"
    proc = subprocess.Popen(torchrun(2, *args), cwd=ROOT, env=wandb_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
        recs = metrics(run_dir) if os.path.exists(run_dir / "metrics.jsonl") else []
        if os.path.exists(run_dir / "checkpoints" / "latest") and recs and recs[-1]["step"] >= 14:
            break
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    first_id = open(run_dir / log.WANDB_ID).read().strip()
    [first] = run_files(run_dir)
    first_steps = [r["_step"] for r in wandb_file.history(first)]
    assert first_steps == list(range(1, len(first_steps) + 1)) and "exit" not in kinds(first)

    out = run(torchrun(2, *args), env=wandb_env(tmp_path), timeout=300).stdout
    assert re.search(r"resumed from \S+ckpt_00000010.pt at step 10 ", out), out
    assert open(run_dir / log.WANDB_ID).read().strip() == first_id
    files = run_files(run_dir)
    assert len(files) == 2 and files[0] == first and all(f.endswith(f"-{first_id}/run-{first_id}.wandb") for f in files)
    second_steps = [r["_step"] for r in wandb_file.history(files[1])]
    total = 66  # 3 epochs x 22 steps (1437 digits / 64)
    assert first_steps + second_steps == list(range(1, total + 1))  # none lost, none twice
    assert second_steps[-1] == total and len(second_steps) == total - len(first_steps)
    assert kinds(files[1])["exit"][0].exit.exit_code == 0
    assert [r["step"] for r in metrics(run_dir) if r["split"] == "train"] == list(range(1, total + 1))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))  # the killed attempt's events hidden, the kept ones logged again
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, total + 1))


def test_metrics_have_data_wait_and_throughput_windows_without_validation(tmp_path, small_run, monkeypatch):
    """img/s windows exclude evaluation: a window that spans an epoch end (validation + checkpoint,
    slowed here by 1 s) reports the training throughput, not the wall time."""
    from imnet import config, dist, train

    slow_eval = train.evaluate

    def evaluate(*a, **kw):
        time.sleep(1.0)
        return slow_eval(*a, **kw)

    monkeypatch.setattr(train, "evaluate", evaluate)
    cfg = config.load(None, small_run("win", "run.epochs=3", "log.every_steps=5", "data.synthetic_size=128"))
    d = dist.setup(cfg.dist)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI tests run (OMP_NUM_THREADS=1): no spinning threads on a busy CPU
    try:
        train.fit(cfg, d)
    finally:
        torch.set_num_threads(threads)
    recs = [r for r in metrics(tmp_path / "win") if r["split"] == "train"]
    spe = 16  # 128 images / 8
    across = [r for r in recs if (r["step"] - 5) // spe != r["step"] // spe]  # windows holding an epoch end
    assert across, recs
    within = [r for r in recs if r not in across and r["step"] > 5]
    for r in recs:
        assert 0 <= r["data_wait"] <= 1 and r["img_per_s"] > 0
    # 5 steps of 8 images take far less than the 1 s of validation here: had it been counted, a
    # crossing window's img/s would be at most 40 / 1 = 40
    assert min(r["img_per_s"] for r in across) > 40
    assert min(r["img_per_s"] for r in across) > 0.3 * min(r["img_per_s"] for r in within)
