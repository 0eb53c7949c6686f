"""Every process fault a long run meets, injected with IMNET_FAULT (imnet/fault.py), and its exact
outcome: weights, steps, exit status, message. RELIABILITY.md lists them with these tests."""

import glob
import json
import os
import pickle
import re
import signal
import subprocess
import time

import pytest
import torch
from conftest import (
    ROOT,
    assert_same_weights,
    cfg_for,
    child_env,
    final_checkpoint,
    fit,
    kill_tree,
    metrics,
    run,
    single,
    torchrun,
    train_steps,
    trajectory,
)

from imnet import dist, fault, schedule
from imnet.checkpoint import Checkpointer
from imnet.checkpoint import load as load_ckpt
from imnet.resume import ResumeError

pytestmark = [pytest.mark.timeout(300)]


def reader(run_dir) -> Checkpointer:
    """Read only: rank 0's Checkpointer (is_main=True) deletes the temp files a killed writer left."""
    return Checkpointer(os.path.join(run_dir, "checkpoints"), is_main=False)


def saved(run_dir) -> list[str]:
    return sorted(os.path.basename(p) for p in reader(run_dir).saved())


def latest(run_dir) -> str:
    return os.path.basename(reader(run_dir).latest())


def wait_for(pred, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"exited {proc.returncode} before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ------------------------------------------------------------------ the hook itself

def test_fault_spec_is_parsed_and_a_typo_is_refused_before_training(tmp_path, monkeypatch):
    f = fault.parse("crash@step=7,rank=1,attempt=0; nan@step=3-5 ;slow_ckpt@step=10,seconds=2.5")
    assert f == [fault.Fault("crash", 7, 7, rank=1, attempt=0), fault.Fault("nan", 3, 5),
                 fault.Fault("slow_ckpt", 10, 10, seconds=2.5)]
    assert f[1].hits(4, 0, 3) and not f[1].hits(6, 0, 0) and not f[1].hits(4, 1, 0)
    assert not f[0].hits(7, 1, 1) and f[0].hits(7, 1, 0)
    assert fault.parse("") == []
    for bad, msg in [("crsh@step=1", "IMNET_FAULT: unknown fault 'crsh'"),
                     ("crash@rank=1", "IMNET_FAULT: 'crash@rank=1' has no step=N"),
                     ("crash@step=x", "IMNET_FAULT: step='x' in 'crash@step=x' is not a number"),
                     ("hang@step=2,node=3", "IMNET_FAULT: 'node=3' in 'hang@step=2,node=3' is not step=N")]:
        with pytest.raises(fault.FaultSpecError, match=msg.replace("(", r"\(").replace("=", "=")):
            fault.parse(bad)
    p = run(single("imnet.train", "data.name=synthetic", f"run.out_dir={tmp_path}"),
            env=child_env(IMNET_FAULT="crash@step=1,rank=one"), check=False)
    assert p.returncode == 2 and "IMNET_FAULT: rank='one' in 'crash@step=1,rank=one' is not a number" in p.stderr
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ resume onto another run

def test_resume_onto_another_epoch_length_is_refused_at_start_and_changes_nothing(tmp_path):
    """Was: the saved position lay past the new epoch's end, and the loop rewrote one checkpoint for ever."""
    fit(cfg_for(tmp_path, "a", "run.max_steps=3"))  # 64 images / 8 = 8 steps an epoch, saved at step 3
    before = (tmp_path / "a" / "metrics.jsonl").read_text()
    args = [f"{k}={v}" for k, v in (("data.name", "synthetic"), ("data.synthetic_size", 64), ("data.image_size", 16),
                                    ("model.gn_groups", 8), ("run.out_dir", tmp_path), ("run.name", "a"),
                                    ("log.progress", "false"))]
    p = run(single("imnet.train", *args, "data.batch_size=16"), timeout=60, check=False)
    path = tmp_path / "a" / "checkpoints" / "ckpt_00000003.pt"
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"imnet.train: error: cannot resume from {path}: it was saved at step 3 of 8 in epoch 0, with 8 images per "
        "optimizer step (data.batch_size=8 x 1 ranks x optim.accum_steps=1); this run has 16 images per step and 4 "
        "steps per epoch, so that position would name other images. Resume with data.batch_size x ranks x "
        "optim.accum_steps = 8, or start a new run (another run.name, or ckpt.resume=never)")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == before
    assert saved(tmp_path / "a") == ["ckpt_00000003.pt"]
    # the same 8 images per step as 2 micro-batches of 4: the position means the same images, resumed
    fit(cfg_for(tmp_path, "a", "data.batch_size=4", "optim.accum_steps=2", "run.max_steps=8"))
    assert train_steps(tmp_path / "a") == list(range(1, 9))


def test_changed_model_optimizer_or_length_is_refused_before_any_weight_is_loaded(tmp_path, capsys):
    fit(cfg_for(tmp_path, "a", "run.max_steps=3"))
    path = tmp_path / "a" / "checkpoints" / "ckpt_00000003.pt"
    cases = [
        (["model.norm=bn"], "model.norm (gn -> bn) changed since it was saved, and its weights do not fit this model "
                            "(12 missing (e.g. "),
        (["optim.name=adamw"], "optim.name (sgd -> adamw) changed since it was saved, and its optimizer state belongs "
                               "to the other optimizer; resume with optim.name=sgd, or start a new run"),
        (["run.max_steps=2"], "it is at step 3, past this run's last step 2 (run.max_steps (3 -> 2)); raise "
                              "run.epochs or run.max_steps"),
    ]
    for over, msg in cases:
        with pytest.raises(ResumeError) as e:
            fit(cfg_for(tmp_path, "a", *over))
        assert str(e.value).startswith(f"cannot resume from {path}: ") and msg in str(e.value), str(e.value)
    assert "resume with model.norm=gn, or start a new run" in _message(fit, cfg_for(tmp_path, "a", "model.norm=bn"))
    assert train_steps(tmp_path / "a") == [1, 2, 3]
    # GN with one group (ln) has GN's parameters: it loads, and the change is warned about
    capsys.readouterr()
    fit(cfg_for(tmp_path, "a", "model.norm=ln", "run.max_steps=4"))
    assert ("warning: resuming with model.norm (gn -> ln) changed since the checkpoint: the run will not follow "
            "the trajectory it would have had") in capsys.readouterr().out


def _message(f, cfg) -> str:
    with pytest.raises(ResumeError) as e:
        f(cfg)
    return str(e.value)


def test_run_length_change_is_warned_about_when_it_moves_the_learning_rate(tmp_path, capsys):
    for sched in ("cosine", "constant"):
        fit(cfg_for(tmp_path, sched, f"optim.schedule={sched}", "ckpt.every_steps=2", "ckpt.keep=10"))
        ck = tmp_path / sched / "checkpoints" / "ckpt_00000004.pt"
        capsys.readouterr()
        fit(cfg_for(tmp_path, sched + "2", f"optim.schedule={sched}", "run.epochs=2", f"ckpt.resume={ck}"))
        out = capsys.readouterr().out
        if sched == "cosine":  # total steps 8 -> 16: the cosine is stretched from step 5 on
            o = cfg_for(tmp_path, "x", "optim.schedule=cosine").optim
            new, old = (schedule.get_lr(4, peak=o.base_lr * 8 / 256, steps_per_epoch=8, total_steps=total,
                                        schedule="cosine", min_lr=o.min_lr) for total in (16, 8))
            assert (f"warning: resuming with run.epochs (1 -> 2) changed the learning rate schedule (8 -> 16 steps): "
                    f"from step 5 on the lr differs from the saved run's ({new:.4g} instead of {old:.4g})"
                    ) in out, out
        else:  # a constant lr does not care how long the run is
            assert "warning" not in out, out


# ------------------------------------------------------------------ divergence

def test_nonfinite_streak_never_becomes_latest_and_a_rerun_recovers(tmp_path, monkeypatch):
    common = ["run.epochs=3", "ckpt.every_steps=5", "ckpt.keep=10", "dist.max_nonfinite=3"]  # 8 steps an epoch
    monkeypatch.setenv("IMNET_FAULT", "nan@step=9-20")  # steps 9, 10, 11 non-finite: abort at 11
    with pytest.raises(FloatingPointError) as e:
        fit(cfg_for(tmp_path, "div", *common))
    ck = tmp_path / "div" / "checkpoints"
    assert str(e.value) == ("3 non-finite losses in a row (dist.max_nonfinite=3) at step 11: lower optim.base_lr or "
                            f"check the data; {ck}/ckpt_00000008.pt is the newest checkpoint, written before the "
                            "streak")
    assert saved(tmp_path / "div") == ["ckpt_00000005.pt", "ckpt_00000008.pt"]  # not 10: inside the streak
    assert latest(tmp_path / "div") == "ckpt_00000008.pt"
    monkeypatch.delenv("IMNET_FAULT")  # the cause is gone (lower lr, fixed data): the rerun resumes from 8
    fit(cfg_for(tmp_path, "div", *common))
    assert train_steps(tmp_path / "div") == list(range(1, 25))  # one trajectory, steps 9-11 logged once

    monkeypatch.setenv("IMNET_FAULT", "nan@step=9-10")  # a streak of 2 that ends: step 10's checkpoint waits for 11
    fit(cfg_for(tmp_path, "short", *common))
    names = saved(tmp_path / "short")
    assert "ckpt_00000010.pt" not in names and "ckpt_00000011.pt" in names, names
    assert load_ckpt(str(tmp_path / "short" / "checkpoints" / "ckpt_00000011.pt"))["bad_in_row"] == 0
    rows = [r for r in metrics(tmp_path / "short") if r["split"] == "train"]
    assert [r["step"] for r in rows if r["skipped"]] == [9, 10]


# ------------------------------------------------------------------ signals

def _start(args, **env) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_ctrl_c_stops_with_a_checkpoint_and_exit_75_and_a_second_one_exits_at_once(tmp_path, small_run):
    args = single("imnet.train", *small_run("int", "run.epochs=50", "log.every_steps=1"))
    p = _start(args)
    wait_for(lambda: (tmp_path / "int" / "metrics.jsonl").exists() and metrics(tmp_path / "int"), p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == dist.EXIT_STOPPED == 75, err
    step = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert f"stopped by signal at step {step}; checkpoint saved" in out
    assert saved(tmp_path / "int") == [f"ckpt_{step:08d}.pt"] and latest(tmp_path / "int") == f"ckpt_{step:08d}.pt"

    # the second Ctrl-C lands while the first one's checkpoint is being written (stalled for 60 s)
    args = single("imnet.train", *small_run("twice", "run.epochs=50", "log.every_steps=1"))
    p = _start(args, IMNET_FAULT="slow_ckpt@step=1-1000,seconds=60")
    wait_for(lambda: (tmp_path / "twice" / "metrics.jsonl").exists() and metrics(tmp_path / "twice"), p)
    p.send_signal(signal.SIGINT)
    wait_for(lambda: glob.glob(str(tmp_path / "twice" / "checkpoints" / ".ckpt_*")), p)
    t = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t < 20  # at once, not after the 60 s write
    assert p.returncode == 130, (out, err)
    assert "imnet.train: interrupted by a second Ctrl-C: nothing saved since the last checkpoint" in err
    assert "stopped by signal" not in out
    assert os.listdir(tmp_path / "twice" / "checkpoints") == []  # no checkpoint, and no temp file left


# ------------------------------------------------------------------ kill mid-write

@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_latest_whole_and_resumes_exactly(tmp_path, small_run):
    common = ["run.epochs=2", "ckpt.every_steps=5", "log.every_steps=1", "run.deterministic=true"]
    run(single("imnet.train", *small_run("ref", *common)))
    args = single("imnet.train", *small_run("cut", *common))
    p = _start(args, IMNET_FAULT="slow_ckpt@step=10,seconds=120")
    ck = tmp_path / "cut" / "checkpoints"

    def part() -> list[str]:
        return [f for f in glob.glob(str(ck / ".ckpt_00000010.pt.tmp-*")) if os.path.getsize(f) > 0]

    wait_for(part, p)
    kill_tree(p.pid)
    p.wait()
    assert latest(tmp_path / "cut") == "ckpt_00000005.pt" and saved(tmp_path / "cut") == ["ckpt_00000005.pt"]
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):  # the half-written file is no checkpoint
        torch.load(part()[0], weights_only=True)
    out = run(args).stdout
    assert f"resumed from {ck}/ckpt_00000005.pt at step 5 " in out
    assert not glob.glob(str(ck / ".ckpt_*"))  # the dead attempt's temp file is gone
    assert_same_weights(final_checkpoint(tmp_path / "ref"), final_checkpoint(tmp_path / "cut"))
    assert trajectory(tmp_path / "cut") == trajectory(tmp_path / "ref")
    assert train_steps(tmp_path / "ref") == list(range(1, 65))


def test_death_before_the_first_checkpoint_leaves_one_trajectory(tmp_path, small_run):
    args = single("imnet.train", *small_run("early", "run.max_steps=6", "ckpt.every_steps=5", "log.every_steps=1"))
    p = run(args, env=child_env(IMNET_FAULT="crash@step=4"), check=False)
    assert p.returncode == -signal.SIGKILL
    assert train_steps(tmp_path / "early") == [1, 2, 3]
    run(args)
    assert train_steps(tmp_path / "early") == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ several ranks (gloo, loopback only)

def heartbeats(run_dir) -> dict[int, dict]:
    out = {}
    for path in glob.glob(os.path.join(run_dir, "ranks", "rank*.json")):
        with open(path) as f:
            b = json.load(f)
        out[b["rank"]] = b
    return out


@pytest.mark.slow
def test_ctrl_c_to_torchrun_stops_both_ranks_after_the_same_step_with_a_checkpoint(tmp_path, small_run):
    args = torchrun(2, "imnet.train", *small_run("int2", "run.epochs=50", "log.every_steps=1"))
    p = _start(args)
    wait_for(lambda: (tmp_path / "int2" / "metrics.jsonl").exists() and metrics(tmp_path / "int2"), p)
    p.send_signal(signal.SIGINT)  # torchrun passes it on to both workers
    out, err = p.communicate(timeout=120)
    step = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert f"stopped by signal at step {step}; checkpoint saved" in out
    assert saved(tmp_path / "int2") == [f"ckpt_{step:08d}.pt"]
    beats = heartbeats(tmp_path / "int2")
    assert [(r, b["step"], b["phase"]) for r, b in sorted(beats.items())] == [(0, step, "done"), (1, step, "done")]
    # each worker exited 75; torchrun itself, stopped by the signal, exits 1
    assert p.returncode == 1 and "got signal: 2" in err, err[-2000:]


@pytest.mark.slow
def test_a_hung_rank_is_named_and_the_job_fails_within_the_timeout(tmp_path, small_run):
    args = torchrun(2, "imnet.train", *small_run("hang", "run.epochs=5", "log.every_steps=1", "dist.timeout_s=5"))
    t0 = time.monotonic()
    p = run(args, env=child_env(IMNET_FAULT="hang@step=4,rank=1"), check=False, timeout=200)
    took = time.monotonic() - t0
    beats = heartbeats(tmp_path / "hang")
    host, pid = beats[1]["host"], beats[1]["pid"]
    assert p.returncode == 1
    # rank 0's watchdog names rank 1, its host and pid and how far it got; torchrun reports the same line
    line = next(x for x in p.stderr.splitlines() if x.startswith("imnet.train: error: rank 0 "))
    m = re.fullmatch(rf"imnet.train: error: rank 0 \(host {host}\) waited (\d+) s in step 4 \(dist.timeout_s=5\): "
                     rf"rank 1 \(host {host}, pid {pid}\) stopped responding \d+ s ago \(its last report: "
                     r"(starting|waiting for data|in a training step) after (\d) finished steps\): it is stopped, "
                     r"dead, or stuck outside Python", line)
    assert m and 5 <= int(m.group(1)) <= 8 and int(m.group(3)) <= 3, line  # reports are up to ~1 s old
    assert p.stderr.count("stopped responding") >= 2, p.stderr[-3000:]  # stderr, and torchrun's summary
    # timeout 5 s + the watchdog's poll + torchrun's 30 s grace for the stopped worker + start-up
    assert took < 5 + 2 + 30 + 30, took
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stopped worker is gone too


def assert_same_collectives(run_dir, world: int) -> list:
    """Every rank called the same collectives, in the same order, on tensors of the same shapes."""
    calls = []
    for r in range(world):
        with open(os.path.join(run_dir, "collectives", f"rank{r}.jsonl")) as f:
            calls.append([json.loads(line) for line in f])
    for r in range(1, world):
        assert calls[r] == calls[0], f"rank {r} differs from rank 0"
    assert len(calls[0]) > 20
    return calls[0]


def kept_samples(run_dir, world: int) -> dict[int, list[int]]:
    """epoch -> every sample id trained in it, over all ranks and attempts, counting only the steps
    an attempt kept (those up to the checkpoint the next attempt resumed from)."""
    rows = []
    for r in range(world):
        with open(os.path.join(run_dir, "samples", f"rank{r}.jsonl")) as f:
            rows += [json.loads(line) for line in f]
    attempts = sorted({x["attempt"] for x in rows})
    first = {a: min(x["step"] for x in rows if x["attempt"] == a) for a in attempts}
    out: dict[int, list[int]] = {}
    for x in rows:
        nxt = [first[a] for a in attempts if a > x["attempt"]]
        if not nxt or x["step"] < nxt[0]:  # the next attempt resumed at first - 1
            out.setdefault(x["epoch"], []).extend(x["ids"])
    return out


@pytest.mark.slow
def test_max_restarts_finish_by_themselves_training_every_sample_once(tmp_path, small_run):
    """rank 1 killed twice under torchrun --max-restarts=2, on data that does not divide 2 x 8 (250
    images: 15 steps an epoch, 10 left out, a different 10 each epoch; 62 val images), with torch's
    collective checker on (TORCH_DISTRIBUTED_DEBUG=DETAIL: a collective that differs between ranks fails)."""
    common = ["data.synthetic_size=250", "run.epochs=2", "ckpt.every_steps=5", "log.every_steps=1",
              "run.deterministic=true", "data.eval_batch_size=5"]
    env = {"IMNET_TRACE_COLLECTIVES": "1", "IMNET_TRACE_SAMPLES": "1"}
    run(torchrun(2, "imnet.train", *small_run("ref", *common)), env=child_env(**env))
    cmd = torchrun(2, "imnet.train", *small_run("cut", *common))
    cmd.insert(cmd.index("--nproc_per_node"), "--max-restarts=2")
    p = run(cmd, env=child_env(IMNET_FAULT="crash@step=7,rank=1,attempt=0;crash@step=20,rank=1,attempt=1", **env),
            timeout=280)
    ck = tmp_path / "cut" / "checkpoints"
    assert f"resumed from {ck}/ckpt_00000005.pt at step 5 " in p.stdout  # attempt 1: killed at the start of step 7
    assert f"resumed from {ck}/ckpt_00000015.pt at step 15 " in p.stdout  # attempt 2: killed at the start of step 20
    assert_same_weights(final_checkpoint(tmp_path / "ref"), final_checkpoint(tmp_path / "cut"))
    assert final_checkpoint(tmp_path / "cut")["step"] == 30
    assert trajectory(tmp_path / "cut") == trajectory(tmp_path / "ref")
    assert train_steps(tmp_path / "cut") == list(range(1, 31))
    assert [(r["step"], r["n"]) for r in metrics(tmp_path / "cut") if r["split"] == "val"] == [(15, 62), (30, 62)]
    cut, ref = kept_samples(tmp_path / "cut", 2), kept_samples(tmp_path / "ref", 2)
    for epoch in (0, 1):
        ids = cut[epoch]
        assert len(ids) == len(set(ids)) == 240 and set(ids) <= set(range(250))  # each once, 10 left out
        assert sorted(ids) == sorted(ref[epoch])
    assert set(cut[0]) != set(cut[1])  # another 10 left out in epoch 1
    assert_same_collectives(tmp_path / "ref", 2)


@pytest.mark.slow
def test_uneven_data_on_three_ranks_runs_the_same_collectives_and_counts_every_val_image_once(tmp_path, small_run):
    # 250 images over 3 x 8: 10 steps an epoch; 62 val images as 21 + 21 + 20 in batches of 5 (5, 5, 4 batches)
    p = run(torchrun(3, "imnet.train", *small_run("three", "data.synthetic_size=250", "run.epochs=2",
                                                  "data.eval_batch_size=5", "log.every_steps=5")),
            env=child_env(IMNET_TRACE_COLLECTIVES="1"), timeout=280)
    assert [(r["step"], r["n"]) for r in metrics(tmp_path / "three") if r["split"] == "val"] == [(10, 62), (20, 62)]
    assert "final val top1" in p.stdout and final_checkpoint(tmp_path / "three")["step"] == 20
    calls = assert_same_collectives(tmp_path / "three", 3)
    assert calls.count(["all_reduce", [[[5], "torch.float32"]]]) == 20  # one per step: decisions and metrics


@pytest.mark.slow
def test_a_rank_that_raises_or_dies_is_the_root_cause_torchrun_names(tmp_path, small_run):
    p = run(torchrun(2, "imnet.train", *small_run("raise", "run.epochs=2")),
            env=child_env(IMNET_FAULT="raise@step=3,rank=1"), check=False)
    assert p.returncode == 1
    root = p.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root
    assert "RuntimeError: IMNET_FAULT: injected error at step 3 on rank 1" in root
    p = run(torchrun(2, "imnet.train", *small_run("dead", "run.epochs=2")),
            env=child_env(IMNET_FAULT="crash@step=3,rank=1"), check=False)
    assert p.returncode == 1
    root = p.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root and "Signal 9 (SIGKILL) received by PID" in root
    assert saved(tmp_path / "dead") == []  # nothing written after the loss: a rerun starts from the beginning


def test_the_diagnosis_names_silent_ranks_first_then_live_ones_that_lag():
    from imnet.heartbeat import diagnose

    now = 1000.0

    def beat(r, step, phase, t, since=900.0) -> dict:
        return {"rank": r, "host": f"n{r}", "pid": 10 + r, "step": step, "phase": phase, "since": since, "time": t}

    beats = {0: beat(0, 7, "step", now), 1: beat(1, 6, "data", now - 1, since=950.0), 2: beat(2, 7, "step", now)}
    assert diagnose(beats, 4, 0, now, stale_s=10) == ("rank 3 never reported (it did not start, or cannot write to "
                                                      "the run folder)")
    assert diagnose(beats, 3, 0, now, stale_s=10) == ("rank 1 (host n1, pid 11) has been waiting for data for 50 s, "
                                                      "after 6 finished steps")
    beats[2] = beat(2, 7, "step", now - 40)
    assert diagnose(beats, 3, 0, now, stale_s=10) == (
        "rank 2 (host n2, pid 12) stopped responding 40 s ago (its last report: in a training step after 7 finished "
        "steps): it is stopped, dead, or stuck outside Python")
    same = {r: beat(r, 7, "step", now) for r in range(3)}
    assert diagnose(same, 3, 0, now, stale_s=10) == ("no other rank stands out: every rank is in the same step "
                                                     "(a network or collective problem)")


@pytest.mark.slow
def test_without_torchrun_the_surviving_rank_names_the_dead_one(tmp_path, small_run):
    """Two processes started by hand (as srun starts them): rank 1 dies at step 5; rank 0's collective fails
    at once, and its one-line error names rank 1, its host and pid."""
    args = " ".join(small_run("dead", "run.epochs=3", "dist.timeout_s=60"))
    script = ("export MASTER_ADDR=127.0.0.1 MASTER_PORT=29561 WORLD_SIZE=2; "
              f"RANK=0 LOCAL_RANK=0 python -m imnet.train {args} 2> {tmp_path}/r0.err & "
              f"RANK=1 LOCAL_RANK=1 IMNET_FAULT=crash@step=5,rank=1 python -m imnet.train {args} & wait")
    t0 = time.monotonic()
    run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {script}"], timeout=120)
    assert time.monotonic() - t0 < 60  # not dist.timeout_s: a closed connection fails at once
    pid = heartbeats(tmp_path / "dead")[1]["pid"]
    err = (tmp_path / "r0.err").read_text().strip().splitlines()[-1]
    assert err.startswith("imnet.train: error: RuntimeError: ") and "by peer" in err, err
    assert re.search(rf"; rank 1 \(host [^,]+, pid {pid}\) is dead \(its last report: [a-z ]+ after [0-4] finished "
                     r"steps\)$", err), err
