"""launch/submit.py and slurm/ on a real two-node Slurm cluster started by slurm/local/start.sh.

The first test that needs it starts the cluster (munged, slurmctld, two slurmd) in its own network
namespace; it is stopped after the last test here, killing only what it started. Every Slurm
client and every submission runs inside that namespace. Jobs are 2 CPU ranks (one per node) of
tiny synthetic runs.
--dry-run, --local, the option errors and the checks before submitting (data, world size) run
without Slurm: fake Slurm commands first on PATH record any call, and the tests check none happened.
"""

import importlib.util
import itertools
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, child_env, isolated, metrics, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SUBMIT = [sys.executable, os.path.join(ROOT, "launch", "submit.py")]
NETNS = "imnet-slurm-test"            # not the default `imnet-slurm`: a developer's cluster may be up
CPU_TASKS = ["--gpus-per-node", "0", "--tasks-per-node", "1"]
TINY = {"data": {"name": "synthetic", "synthetic_size": 260, "image_size": 16, "batch_size": 8},
        "model": {"gn_groups": 8}, "log": {"progress": False}}
# resnet18 makes a step slow enough (~0.1-0.5 s) to signal a run mid-way; 2 ranks x 8 images:
# 16 steps per epoch, 32 in all; deterministic so that runs can be compared loss for loss
SLOW = ["model.arch=resnet18", "run.epochs=2", "log.every_steps=1", "run.deterministic=true"]
STEPS = 32


class Cluster:
    def __init__(self, folder):
        self.folder = str(folder)
        self.env = child_env(SLURM_CONF=os.path.join(self.folder, "slurm.conf"), PYTHON=sys.executable,
                             PATH=os.path.join(ROOT, "slurm", "local", "bin") + os.pathsep + os.environ["PATH"])
        for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
            self.env.pop(k, None)

    def ns(self, *cmd) -> list:
        return ["ip", "netns", "exec", NETNS, *cmd]

    def run(self, *cmd, timeout=500, check=True, cwd=ROOT):
        return run(self.ns(*cmd), env=self.env, timeout=timeout, check=check, cwd=cwd)

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o` as a dict (the job's first record)."""
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout.splitlines()[0]
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def finished(self, job_id: str, timeout=400) -> dict:
        """Wait until Slurm has ended the job (results can be written while it is still COMPLETING)."""
        deadline = time.time() + timeout
        while (info := self.job(job_id))["JobState"] in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED",
                                                         "CONFIGURING", "SUSPENDED"):
            assert time.time() < deadline, info
            time.sleep(0.5)
        return info


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "ip") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        # a failure, not a skip: the README's test command installs them, so missing means broken
        pytest.fail(f"needs root and slurm-wlm + munge (missing: {missing}): run bash slurm/local/install.sh")
    folder = tmp_path_factory.mktemp("slurm-cluster")
    env = dict(os.environ, IMNET_SLURM_NETNS=NETNS)
    try:
        start = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local", "start.sh"), str(folder)], env=env,
                               capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, f"start.sh failed:\n{start.stdout}\n{start.stderr}"
        yield Cluster(folder)
    finally:
        stop = subprocess.run(["bash", os.path.join(ROOT, "slurm", "local", "stop.sh"), str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-runs")
    with open(d / "tiny.yaml", "w") as f:
        yaml.safe_dump({"run": {"out_dir": str(d / "runs")}, **TINY}, f)
    return d


@pytest.fixture
def no_slurm(tmp_path):
    """Env whose PATH starts with fake Slurm commands that record any call (and fail)."""
    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    for name in ("srun", "sbatch", "scontrol", "squeue", "sacct", "scancel", "sinfo"):
        (fake / name).write_text(f"#!/bin/sh\necho {name} >> {fake}/called\nexit 99\n")
        (fake / name).chmod(0o755)
    env = child_env(PATH=str(fake) + os.pathsep + os.environ["PATH"])
    env.pop("SLURM_CONF", None)
    yield env
    assert not (fake / "called").exists(), f"a Slurm command was called: {(fake / 'called').read_text()}"


def job_id(stdout: str) -> str:
    m = re.search(r"submitted job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in metrics(run_dir) if r["split"] == "train"]


def losses(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if r["split"] == "train"]


def latest(run_dir) -> dict:
    ck = os.path.join(run_dir, "checkpoints")
    return torch.load(os.path.join(ck, open(os.path.join(ck, "latest")).read().strip()), weights_only=True)


def logs(folder, jid: str) -> str:
    """All of a job's submitit logs (both ranks, stdout and stderr), for failure messages too."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"{jid}_") and name.endswith((".out", ".err")):
            out.append(f"==> {name}\n" + open(os.path.join(folder, name)).read())
    return "\n".join(out)


def wait_for_steps(run_dir, n: int, proc=None, timeout=300):
    deadline = time.time() + timeout
    while True:
        try:
            if len(train_steps(run_dir)) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no {n} steps in {run_dir} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(cluster, workdir):
    """One uninterrupted 2-node run through launch/submit.py, for the tests below to compare with."""
    out = cluster.run(*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "2", *CPU_TASKS, "--wait",
                      "run.name=ref", *SLOW)
    return out.stdout, job_id(out.stdout), workdir / "runs" / "ref"


def test_two_node_ddp_run(cluster, reference):
    stdout, jid, run_dir = reference
    slurm_dir = run_dir / "slurm"
    assert f"tail -f {slurm_dir}/{jid}_0_log.out {slurm_dir}/{jid}_0_log.err" in stdout, stdout
    done = json.loads(stdout.split(f"job {jid} done: ")[1].splitlines()[0])
    assert done["step"] == STEPS and done["n"] == 65
    # one task on each of the two nodes, rendezvous at the first node's name
    assert cluster.finished(jid)["NodeList"] == "imnet-node[1-2]"
    acct = cluster.run("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", jid).stdout
    assert f"{jid}|COMPLETED|imnet-node[1-2]" in acct.splitlines()
    info = json.load(open(run_dir / "run_info.json"))
    assert info["world"] == 2 and info["launcher"] == "submitit"
    log = logs(slurm_dir, jid)
    assert "global_rank=0(2)" in log and "global_rank=1(2)" in log
    # metrics and checkpoint in the run folder
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    val = [r for r in metrics(run_dir) if r["split"] == "val"]
    assert [v["step"] for v in val] == [16, 32] and val[-1]["loss"] == pytest.approx(done["loss"])
    assert latest(run_dir)["step"] == STEPS

    # Both ranks hold the same weights: the logged validation was computed by rank 0 on its shard
    # and by rank 1 on the other with its own weights; one process evaluating rank 0's checkpoint
    # on the whole split must find the same loss. Negative control: the epoch-1 checkpoint does not.
    ck = run_dir / "checkpoints"
    one = json.loads(run([sys.executable, "-m", "imnet.evaluate", "--checkpoint", str(ck)]).stdout.splitlines()[-1])
    assert one["step"] == STEPS and one["n"] == 65
    assert one["loss"] == pytest.approx(val[-1]["loss"], rel=1e-5) and one["top1"] == pytest.approx(val[-1]["top1"])
    early = json.loads(run([sys.executable, "-m", "imnet.evaluate", "--checkpoint",
                            str(ck / "ckpt_00000016.pt")]).stdout.splitlines()[-1])
    assert early["loss"] == pytest.approx(val[0]["loss"], rel=1e-5)
    assert abs(early["loss"] - one["loss"]) > 1e-3


@pytest.mark.parametrize("how", ["usr2", "scontrol-requeue"])
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, workdir, reference, how):
    """usr2: what Slurm sends 90 s before the time limit. The loop stops all ranks after the same step
    and saves; then submitit's handler calls Trainer.checkpoint() and requeues the job.
    scontrol-requeue: what an admin (or preemption with PreemptMode=REQUEUE) does; Slurm sends SIGTERM,
    the loop saves the same way and Slurm itself starts the job again (within KillWait=10 s).
    Either way the new attempt resumes from `latest` although the job was submitted with
    ckpt.resume=never: no resume setting or checkpoint path is frozen into the job's pickle."""
    run_dir = workdir / "runs" / f"pre-{how}"
    p = subprocess.Popen(cluster.ns(*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "2", *CPU_TASKS,
                                    "--max-requeues", "2", "--wait", f"run.name=pre-{how}", "ckpt.resume=never", *SLOW),
                         cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        jid = job_id(first)
        wait_for_steps(run_dir, 3, p)
        if how == "usr2":
            cluster.run("scancel", "--signal=USR2", jid)
        else:
            cluster.run("scontrol", "requeue", jid)
        out, err = p.communicate(timeout=500)
    finally:
        if p.poll() is None:
            p.kill()
    log = logs(run_dir / "slurm", jid)
    assert p.returncode == 0, f"{first}{out}\n{err}\n{log}"
    assert cluster.finished(jid)["Restarts"] == "1", log
    stopped = int(re.search(r"stopped by signal at step (\d+); checkpoint saved", log).group(1))
    assert 3 <= stopped < STEPS, log
    assert f"stopped at step {stopped}; the next attempt resumes from the latest checkpoint" in log
    assert re.search(rf"resumed from \S+ckpt_{stopped:08d}.pt at step {stopped} ", log), log
    done = json.loads(out.split(f"job {jid} done: ")[1].splitlines()[0])
    assert done["step"] == STEPS
    # every step exactly once, and the same trajectory and weights as the uninterrupted run
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(reference[2])
    assert latest(run_dir)["step"] == STEPS
    ref_w, w = latest(reference[2])["model"], latest(run_dir)["model"]
    assert all(torch.equal(ref_w[k], w[k]) for k in ref_w)
    with open(run_dir / "slurm" / f"{jid}_submitted.pkl", "rb") as f:
        pickled = pickle.load(f)
    assert pickled._timeout_countdown == 2  # --max-requeues; a preemption does not count as a timeout
    if how == "usr2":  # submitit replaced the job's pickle with Trainer.checkpoint()'s
        assert "Calling checkpoint method" in log and f"Requeued job {jid} (2 remaining timeouts)" in log
        assert pickled.function.tree["ckpt"]["resume"] == "auto"
    else:  # the original pickle ran again; SLURM_RESTART_COUNT made it resume
        assert "Calling checkpoint method" not in log
        assert pickled.function.tree["ckpt"]["resume"] == "never"


def test_sbatch_template_requeues_on_usr2(cluster, workdir, reference, tmp_path):
    """slurm/train.sbatch without submitit: USR2 to the batch shell (Slurm's --signal=B:USR2@120)."""
    run_dir = workdir / "runs" / "sb"
    out = cluster.run("sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
                      "--time=10", os.path.join(ROOT, "slurm", "train.sbatch"), "--config", str(workdir / "tiny.yaml"),
                      "run.name=sb", "ckpt.resume=never", *SLOW, cwd=tmp_path).stdout
    jid = re.search(r"Submitted batch job (\d+)", out).group(1)
    wait_for_steps(run_dir, 3)
    cluster.run("scancel", "--batch", "--signal=USR2", jid)
    info = cluster.finished(jid)
    log = open(tmp_path / f"slurm-imnet-{jid}.out").read()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    stopped = int(re.search(r"stopped by signal at step (\d+); checkpoint saved", log).group(1))
    assert f"requeueing job {jid}" in log, log
    assert re.search(rf"job {jid} attempt 2 on .* ckpt.resume=never .* ckpt.resume=auto\n", log), log
    assert re.search(rf"resumed from \S+ckpt_{stopped:08d}.pt at step {stopped} ", log), log
    assert train_steps(run_dir) == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(reference[2])


def test_sweep_runs_as_job_array(cluster, workdir):
    sweep = workdir / "grid4.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(workdir / "tiny.yaml"),
                                     "grid": {"model.norm": ["gn", "bn"], "run.seed": [0, 1]}}))
    out = cluster.run(*SUBMIT, "--sweep", str(sweep), "--nodes", "1", *CPU_TASKS, "--array-parallelism", "2",
                      "--wait", "run.max_steps=3").stdout
    array = re.search(r"as job array (\d+)", out).group(1)
    root = workdir / "runs" / "grid4"
    names = {"norm=gn,seed=0", "norm=gn,seed=1", "norm=bn,seed=0", "norm=bn,seed=1"}
    assert set(os.listdir(root)) == names | {"slurm"}
    # the printed table: job, one column per grid key, run folder
    assert re.search(r"job\s+model\.norm\s+run\.seed\s+run folder", out), out
    for i, name in enumerate(["norm=gn,seed=0", "norm=gn,seed=1", "norm=bn,seed=0", "norm=bn,seed=1"]):
        assert re.search(rf"{array}_{i}\s+{name[5:7]}\s+{name[-1]}\s+{name}", out), out
        cfg = yaml.safe_load(open(root / name / "config.yaml"))
        assert (cfg["model"]["norm"], cfg["run"]["seed"]) == (name[5:7], int(name[-1]))
        assert cfg["run"]["name"] == f"grid4/{name}"
        assert latest(root / name)["step"] == 3
        assert f"job {array}_{i} done: " in out
    for i in range(4):
        cluster.finished(f"{array}_{i}")
    script = open(root / "slurm" / f"{array}_submission.sh").read()
    assert "#SBATCH --array=0-3%2" in script
    acct = cluster.run("sacct", "-o", "JobID,State", "--parsable2", "-j", array).stdout.splitlines()
    assert sorted(acct[1:]) == [f"{array}_{i}|COMPLETED" for i in range(4)]


PROGRESS = r"^\[\d\d:\d\d:\d\d\] {}: (\d+ running, \d+ done, \d+ failed, \d+ pending)$"


def test_passed_through_options_and_wait_progress(cluster, workdir):
    """--slurm options reach Slurm: job A is held (`--slurm hold`, a flag) with a mail type and a
    comment; a sweep depends on it (`--slurm dependency=afterok:A`) and stays pending until A is
    released and done. --wait prints the sweep's counts whenever they change; one point fails (its
    data exists only in its config: --no-data-check submits it anyway), so the exit status is 1."""
    out = cluster.run(*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "1", *CPU_TASKS, "--slurm", "hold",
                      "--slurm", "mail-type=END", "--slurm", "comment=GN vs BN, it's #1", "run.name=held",
                      "run.max_steps=2").stdout
    held = job_id(out)
    info = cluster.run("scontrol", "show", "job", "-o", held).stdout
    for field in ("JobState=PENDING", "Reason=JobHeldUser", "MailType=END", "Comment=GN vs BN, it's #1 "):
        assert field in info, (field, info)

    sweep = workdir / "progress.yaml"
    sweep.write_text(yaml.safe_dump({"base": str(workdir / "tiny.yaml"),
                                     "grid": {"data.name": ["synthetic", "cifar10"]}}))
    p = subprocess.Popen(cluster.ns(*SUBMIT, "--sweep", str(sweep), "--nodes", "1", *CPU_TASKS, "--slurm",
                                    f"dependency=afterok:{held}", "--no-data-check", "--wait", "--poll", "0.5",
                                    f"data.root={workdir}/no-data", "run.max_steps=2"),
                         cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = ""
        while not re.search(PROGRESS.format("sweep progress"), head, re.MULTILINE):
            line = p.stdout.readline()
            assert line, (head, p.communicate())
            head += line
        array = re.search(r"as job array (\d+)", head).group(1)
        pending = cluster.run("squeue", "-h", "-o", "%i %E", "-j", array).stdout
        assert pending == f"{array}_[0-1%2] afterok:{held}(unfulfilled)\n", pending
        cluster.run("scontrol", "release", held)
        out, err = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, (head, out, err)
    progress = re.findall(PROGRESS.format("sweep progress"), head + out, re.MULTILINE)
    assert progress[0] == "0 running, 0 done, 0 failed, 2 pending"  # waiting for the held job
    assert progress[-1] == "0 running, 1 done, 1 failed, 0 pending", progress
    assert all(a != b for a, b in itertools.pairwise(progress)), progress  # a line only when the counts change
    assert all(sum(int(n) for n in re.findall(r"\d+", c)) == 2 for c in progress), progress
    assert f"job {array}_0 done: " in out and f"job {array}_1 " not in out
    assert f"job {array}_1 failed: " in err and "FileNotFoundError: dataset 'cifar10' (val) not found" in err
    assert "pending with reason" not in out  # Dependency: a reason to wait, not one to warn about
    script = (workdir / "runs" / "progress" / "slurm" / f"{array}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{held}\n" in script
    assert cluster.finished(held)["JobState"] == "COMPLETED"
    assert cluster.finished(f"{array}_0")["StartTime"] >= cluster.job(held)["EndTime"]


def test_wait_reports_a_job_slurm_will_not_start(cluster, workdir):
    """10 CPUs per task on 4-CPU nodes: Slurm keeps the job pending for ever (reason PartitionConfig).
    --wait says so instead of waiting in silence; cancelled, the job counts as failed (exit 1)."""
    p = subprocess.Popen(cluster.ns(*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "1", *CPU_TASKS,
                                    "--cpus-per-task", "10", "--wait", "--poll", "0.5", "run.name=big"),
                         cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = ""
        while "pending with reason" not in head:
            line = p.stdout.readline()
            assert line, (head, p.communicate())
            head += line
        jid = job_id(head)
        progress = re.search(PROGRESS.format(f"job {jid}"), head, re.MULTILINE).group(1)
        assert progress == "0 running, 0 done, 0 failed, 1 pending"
        assert head.endswith(f"] job {jid} pending with reason PartitionConfig: Slurm will not start it as submitted "
                             f"(scontrol show job {jid} says what it asks for; scancel {jid})\n"), head
        cluster.run("scancel", jid)
        out, err = p.communicate(timeout=200)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, (head, out, err)
    assert re.findall(PROGRESS.format(f"job {jid}"), out, re.MULTILINE) == ["0 running, 0 done, 1 failed, 0 pending"]
    assert f"job {jid} failed: " in err and "(state: CANCELLED)" in err


def test_sbatch_template_cpu_recipe_as_written(cluster, tmp_path):
    """The CPU line of slurm/train.sbatch's header, run as written from a folder laid out like the
    repository (slurm/, configs/; the job's log lands there), trainer overrides appended to keep it
    short: 2 nodes x 2 ranks finish. Negative control: without its --cpus-per-task the job asks for
    the header's 10 CPUs per task, more than a node has, and Slurm keeps it pending (PartitionConfig)."""
    with open(os.path.join(ROOT, "slurm", "train.sbatch")) as f:
        header = [line for line in f if line.startswith("#   sbatch ")]
    recipe = [shlex.split(line[1:]) for line in header if "--gpus-per-node=0" in line]
    assert len(recipe) == 1 and "--cpus-per-task=1" in recipe[0], header
    for d in ("slurm", "configs"):
        (tmp_path / d).symlink_to(os.path.join(ROOT, d))
    short = ["run.max_steps=4", f"run.out_dir={tmp_path}/runs"]

    control = cluster.run(*[a for a in recipe[0] if not a.startswith("--cpus-per-task")], *short, cwd=tmp_path).stdout
    cjid = re.search(r"Submitted batch job (\d+)", control).group(1)
    try:
        deadline = time.time() + 60
        while (info := cluster.job(cjid))["Reason"] != "PartitionConfig":
            assert info["JobState"] == "PENDING" and time.time() < deadline, info
            time.sleep(0.5)
        assert info["NumCPUs"] == "40", info  # 2 nodes x 2 tasks x 10
    finally:
        cluster.run("scancel", cjid)

    out = cluster.run(*recipe[0], *short, cwd=tmp_path).stdout
    jid = re.search(r"Submitted batch job (\d+)", out).group(1)
    info = cluster.finished(jid)
    log = (tmp_path / f"slurm-imnet-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "imnet-node[1-2]", log
    assert (info["NumNodes"], info["NumTasks"], info["NumCPUs"]) == ("2", "4", "4"), info
    assert re.search(r"final val top1 [\d.]+ top5 [\d.]+ loss [\d.]+ \(n=360\)", log), log
    assert json.loads((tmp_path / "runs" / "digits_gn" / "run_info.json").read_text())["world"] == 4
    assert latest(tmp_path / "runs" / "digits_gn")["step"] == 4


def test_local_executor_runs_two_ranks_without_slurm(tmp_path, no_slurm, workdir):
    out = run(isolated([*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--local", "--gpus-per-node", "0",
                        "--tasks-per-node", "2", "run.max_steps=4", f"run.out_dir={tmp_path}", "run.name=loc"]),
              env=no_slurm).stdout
    assert "submitit local executor" in out
    done = json.loads(re.search(r"done: (\{.*\})", out).group(1))
    assert done["step"] == 4 and done["n"] == 65
    info = json.load(open(tmp_path / "loc" / "run_info.json"))
    assert info["world"] == 2 and info["launcher"] == "submitit"
    assert latest(tmp_path / "loc")["step"] == 4

    # The same command with one task (what --local gives by default on a machine without GPUs) would
    # resume the finished run with another world size: other steps per epoch, more steps. Refused,
    # for --local and Slurm alike, unless the world size matches or ckpt.resume=never.
    before = metrics(tmp_path / "loc")
    again = [*SUBMIT, "--config", str(workdir / "tiny.yaml"), "run.max_steps=4", f"run.out_dir={tmp_path}",
             "run.name=loc"]
    ckpt = tmp_path / "loc" / "checkpoints" / "ckpt_00000004.pt"
    for how in (["--local"], ["--local", "--gpus-per-node", "0", "--tasks-per-node", "1"], [*CPU_TASKS, "--dry-run"]):
        p = run([*again, *how], env=no_slurm, check=False)
        assert p.returncode == 2, (how, p.stdout, p.stderr)
        assert p.stderr.endswith(
            f"launch/submit.py: error: nothing submitted:\n  {tmp_path}/loc would resume from {ckpt}, which was "
            "trained with world size 2; this submission plans 1 (1 node(s) x 1 task(s)): steps per epoch, and so "
            "the total steps, would change (a finished run would train further). Ask for 2 tasks in all (--nodes x "
            "--tasks-per-node, or x --gpus-per-node), or give another run.name, or ckpt.resume=never to train it "
            "again from scratch\n"), (how, p.stderr)
    assert metrics(tmp_path / "loc") == before
    for ok in (["--nodes", "2", *CPU_TASKS], ["--tasks-per-node", "2", "--gpus-per-node", "0"],
               [*CPU_TASKS, "ckpt.resume=never"], [*CPU_TASKS, "run.name=other"]):
        assert "#SBATCH --signal=USR2@90\n" in run([*again, *ok, "--dry-run"], env=no_slurm).stdout
    # a damaged checkpoint: the job would set it aside and take the one before (here none): said before
    # submitting, and left in place (the check only reads); a damaged ckpt.resume=PATH is refused
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    bad = tmp_path / "bad" / "checkpoints" / "ckpt_00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    p = run([*again, *CPU_TASKS, "run.name=bad", "--dry-run"], env=no_slurm, check=False)
    assert p.returncode == 0 and (f"warning: checkpoint {bad}: unreadable (BadZipFile: File is not a zip file); "
                                  "trying the one before\n") in p.stderr, p.stderr
    assert bad.exists()
    p = run([*again, *CPU_TASKS, "run.name=bad2", f"ckpt.resume={bad}", "--dry-run"], env=no_slurm, check=False)
    assert p.returncode == 2, p.stderr
    assert (f"error: nothing submitted:\n  {tmp_path}/bad2 would resume from {bad}, which "
            f"cannot be used: {bad}: unreadable (BadZipFile: File is not a zip file)") in p.stderr, p.stderr


def test_dry_run_prints_the_sbatch_script_without_slurm(tmp_path, no_slurm, workdir):
    out = run([*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "4", "--partition", "gpu", "--qos",
               "high", "--account", "lab", "--constraint", "a100", "--time", "01:30:00", "--mem", "64G",
               "--exclusive", "--cpus-per-task", "10", "--job-name", "r50", f"run.out_dir={tmp_path}", "--dry-run"],
              env=no_slurm).stdout
    for line in ["--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--qos=high",
                 "--account=lab", "--constraint=a100", "--time=90", "--mem=64G", "--exclusive", "--cpus-per-task=10",
                 "--job-name=r50", "--signal=USR2@90", "--requeue", "--open-mode=append"]:
        assert f"#SBATCH {line}\n" in out, (line, out)
    assert f"--output={tmp_path}/run/slurm/%j_0_log.out" in out
    assert re.search(r"srun .*--kill-on-bad-exit=1 .*-m submitit.core._submit", out)
    assert not os.path.exists(tmp_path / "run")  # nothing written
    cpu = run([*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--nodes", "2", *CPU_TASKS[:2], "--tasks-per-node", "3",
               "--dry-run"], env=no_slurm).stdout
    assert "#SBATCH --ntasks-per-node=3\n" in cpu and "gpus" not in cpu


def test_dry_run_of_a_sweep(tmp_path, no_slurm, workdir):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "bs", "grid": {"data.batch_size": [2, 4, 8], "model.norm": "gn"}}))
    out = run([*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--sweep", str(sweep), *CPU_TASKS,
               "--array-parallelism", "2", f"run.out_dir={tmp_path}", "--dry-run"], env=no_slurm).stdout
    assert "#SBATCH --array=0-2%2\n" in out and "#SBATCH --job-name=bs\n" in out
    for b in (2, 4, 8):
        assert f"# would run {tmp_path}/bs/batch_size={b},norm=gn\n" in out



def test_the_shipped_sweep_validates_every_point(tmp_path, no_slurm):
    """configs/sweeps/cifar10_batch.yaml (GN vs BN x 5 batch sizes), from another folder: its base
    config resolves next to the sweep file and all 10 points pass validation and the data check
    (data.root=data, relative to where submit.py runs: empty files of CIFAR-10's names suffice)."""
    cifar = tmp_path / "data" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (cifar / name).touch()
    out = run([*SUBMIT, "--sweep", os.path.join(ROOT, "configs", "sweeps", "cifar10_batch.yaml"), *CPU_TASKS,
               "data.loader=gpu", f"run.out_dir={tmp_path}", "--dry-run"], env=no_slurm, cwd=tmp_path).stdout
    with open(os.path.join(ROOT, "configs", "sweeps", "cifar10_batch.yaml")) as f:
        grid = yaml.safe_load(f)["grid"]
    n = len(grid["model.norm"]) * len(grid["data.batch_size"])
    assert grid["model.norm"][:2] == ["gn", "bn"] and n >= 10
    assert f"#SBATCH --array=0-{n - 1}%{n}\n" in out  # all at once unless --array-parallelism
    for norm in grid["model.norm"]:
        for b in grid["data.batch_size"]:
            assert f"# would run {tmp_path}/cifar10_batch/norm={norm},batch_size={b}\n" in out

BAD = [
    (["--nodes", "0"], "--nodes must be at least 1 (got 0)"),
    (["--partition", "gpu;rm -rf /"], "--partition 'gpu;rm -rf /': use letters, digits"),
    (["--qos", "a b"], "--qos 'a b'"),
    (["--config", "no/such.yaml"], "--config: no such file 'no/such.yaml'"),
    (["optim.lr=0.1"], "optim.lr: unknown key"),
    (["--time", "0"], "--time '0': expected minutes"),
    (["--time", "1:2"], "--time '1:2'"),
    (["--mem", "lots"], "--mem 'lots'"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
    (["--local", "--nodes", "2"], "--local runs on this machine: --nodes must be 1"),
    (["--local", "--partition", "gpu"], "--partition is a Slurm option: not with --local"),
    (["--array-parallelism", "2"], "--array-parallelism is for --sweep"),
    (["--sweep", "SWEEP", "model.norm=bn"], "model.norm set by the sweep, not also on the command line"),
    (["--sweep", "SWEEP", "--config", "CONFIG"], "and the sweep's base"),
    (["--sweep", "BADSWEEP"], "sweep point norm=xx: model.norm: Input should be"),
    (["--sweep", "no/such/sweep.yaml"], "--sweep: no such file"),
    (["--slurm", "nodes=2"], "--slurm nodes: imnet sets this sbatch option itself: use --nodes\n"),
    (["--slurm", "ntasks-per-node=2"], ("--slurm ntasks-per-node: imnet sets this sbatch option itself: use "
                                        "--tasks-per-node (CPU tasks) or --gpus-per-node (a task per GPU)\n")),
    (["--slurm", "signal=USR1@60"], "--slurm signal: imnet sets this sbatch option itself: USR2 90 s before"),
    (["--slurm", "output=x.log"], "--slurm output: imnet sets this sbatch option itself: use --folder\n"),
    (["--slurm", "array=0-3"], "--slurm array: imnet sets this sbatch option itself: --sweep makes the job array"),
    (["--slurm", "mail_type=END"], ("--slurm 'mail_type=END': expected KEY=VALUE (or KEY alone, a flag) with KEY "
                                    "an sbatch long option name (letters, digits, '-'), e.g. mail-type=END (sbatch "
                                    "spells it mail-type)\n")),
    (["--slurm", "x=1"], "--slurm 'x=1': expected KEY=VALUE (or KEY alone, a flag) with KEY an sbatch"),
    (["--slurm", "mail-type="], "--slurm 'mail-type=': the value must be non-empty, without control characters"),
    (["--slurm", "comment=a\nb"], ("--slurm 'comment=a\\nb': the value must be non-empty, without control "
                                    "characters (a newline would break the batch script)\n")),
    (["--slurm", "mail-type=END", "--slurm", "mail-type=FAIL"], "--slurm mail-type given twice\n"),
    (["--slurm", "account=a", "--account", "b"], "--slurm account=a and --account b: give one\n"),
    (["--slurm", "qos=a;b"], "--qos 'a;b': use letters, digits"),
    (["--slurm", "partition"], "--slurm partition: needs a value (--slurm partition=VALUE)\n"),
    (["--constraint", "a\nb"], "--constraint 'a\\nb': no control characters\n"),
    (["--job-name", "a\nb"], "--job-name 'a\\nb': no control characters\n"),
    (["--folder", "logs\n#SBATCH --x"], "--folder 'logs\\n#SBATCH --x': no control characters\n"),
    (["--partition", "gpu\n"], "--partition 'gpu\\n': use letters, digits"),
    (["--slurm", "mail-user=a\tb"], "--slurm 'mail-user=a\\tb': the value must be non-empty, without control"),
    (['run.name="a\\nb"'], "run.name: 'a\\nb' contains a control character (newline, tab, ...)\n"),
    (["run.name=../x"], "run.name: '../x': expected a folder name, or names joined by '/'"),
    (["--local", "--slurm", "mail-type=END"], "--slurm options are for Slurm: not with --local\n"),
    (["--wait", "--poll", "0"], "--poll must be more than 0 seconds (got 0.0)\n"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_fail_before_submitting(tmp_path, no_slurm, workdir, args, message):
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"base": str(workdir / "tiny.yaml"),
                                                         "grid": {"model.norm": ["gn", "bn"]}}))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": str(workdir / "tiny.yaml"),
                                                       "grid": {"model.norm": ["gn", "xx"]}}))
    subst = {"SWEEP": str(tmp_path / "sweep.yaml"), "BADSWEEP": str(tmp_path / "bad.yaml"),
             "CONFIG": str(workdir / "tiny.yaml")}
    args = [subst.get(a, a) for a in args]
    p = run([*SUBMIT, *args, f"run.out_dir={tmp_path}/runs"], env=no_slurm, check=False, cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------ other sbatch options, checks before submitting

def test_dry_run_passes_other_sbatch_options_through(tmp_path, no_slurm, workdir):
    """--slurm KEY=VALUE -> one `#SBATCH --KEY=VALUE` line each (shell-quoted where needed; sbatch
    unquotes #SBATCH values as a shell would); KEY alone is a flag; a key with an option of its
    own (account, qos, constraint, ...) sets that option, so it is written once."""
    out = run([*SUBMIT, "--config", str(workdir / "tiny.yaml"), *CPU_TASKS, "--slurm", "mail-type=END",
               "--slurm", "mail-user=me@lab.org", "--slurm", "dependency=afterok:123", "--slurm", "account=lab",
               "--slurm", "qos=high", "--slurm", "constraint=a100&ib", "--slurm", "comment=GN vs BN, it's #1",
               "--slurm", "overcommit", "--slurm", "wckey=norm", f"run.out_dir={tmp_path}", "--dry-run"],
              env=no_slurm).stdout
    for line in ["--mail-type=END", "--mail-user=me@lab.org", "--dependency=afterok:123", "--account=lab",
                 "--qos=high", "--constraint='a100&ib'", "--comment='GN vs BN, it'\"'\"'s #1'", "--overcommit",
                 "--wckey=norm", "--nodes=1", "--ntasks-per-node=1", "--signal=USR2@90", "--requeue"]:
        assert f"#SBATCH {line}\n" in out, (line, out)
    sbatch = [line.split("=")[0] for line in out.splitlines() if line.startswith("#SBATCH ")]
    assert len(sbatch) == len(set(sbatch)), sbatch  # every option once (wckey: ours replaced submitit's)


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DATA_HINT = "(data is looked for on this host; --no-data-check skips that, for data only the compute nodes see)"


def data_cases(root):
    """(data.name, files made under root, the error's line) for each dataset with files."""
    cifar = [f"{root}/cifar-10-batches-py/{n}" for n in
             [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]]
    mnist = [f"{root}/MNIST/raw/{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k")
             for k, d in (("images", 3), ("labels", 1))]
    imagenet_help = (f"Expected layout: {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per "
                     "class with the same class folders in both.")
    h5_help = f"Expected either the fast layout {root}/train.h5 + {root}/val.h5 (write it with"
    download = "To download it (needs internet), run: python -m imnet.download --dataset {} --root " + root
    return [
        ("cifar10", cifar[1:], f"dataset 'cifar10' not found: missing {cifar[0]}. {download.format('CIFAR10')}\n"),
        ("mnist", [], f"dataset 'mnist' not found: missing {', '.join(mnist)}. {download.format('MNIST')}\n"),
        ("svhn", [f"{root}/train_32x32.mat"],
         f"dataset 'svhn' not found: missing {root}/test_32x32.mat. {download.format('SVHN')}\n"),
        ("imagenet", [f"{root}/train/n01440764/a.JPEG"], f"dataset 'imagenet' not found: missing {root}/val. "
                                                         + imagenet_help),
        ("tiny_imagenet", [f"{root}/wnids.txt", f"{root}/train/n01443537/images/a.JPEG"],
         f"dataset 'tiny_imagenet' not found: missing {root}/val/val_annotations.txt. Download {TINY_URL} and "
         + "unzip it; data.root is its tiny-imagenet-200 folder.\n"),
        ("h5", [f"{root}/train.h5"], f"dataset 'h5' not found: missing {root}/val.h5. {h5_help}"),
        ("h5", [f"{root}/train/data.hy", f"{root}/val/id.txt"],
         f"dataset 'h5' not found: missing {root}/train/id.txt, {root}/val/data.hdf5. {h5_help}"),
        ("h5", [f"{root}/id.txt"], f"dataset 'h5' not found: missing {root}/data.hdf5. {h5_help}"),
    ]


@pytest.fixture(scope="module")
def submit_py():
    """launch/submit.py as a module, for its checks in this process."""
    spec = importlib.util.spec_from_file_location("imnet_launch_submit", os.path.join(ROOT, "launch", "submit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", range(8), ids=["cifar10", "mnist", "svhn", "imagenet", "tiny_imagenet", "h5-fast",
                                                "h5-folders", "h5-one-file"])
def test_missing_data_says_what_is_missing(tmp_path, submit_py, case):
    """Each dataset's files (README "Where the files must be"): what is missing, where, how to get it;
    None once the last one is there. Only presence counts (empty files here)."""
    root = tmp_path / "data"
    name, files, message = data_cases(str(root))[case]
    for f in files:
        os.makedirs(os.path.dirname(f), exist_ok=True)
        open(f, "w").close()
    got = submit_py.missing_data({"name": name, "root": str(root)})
    if message.endswith("\n"):  # the whole message
        assert got == message[:-1]
    else:  # its start: the rest is imnet's layout help
        assert got.startswith(message), got
    for missing in re.search(r"missing (.*?)\. [A-Z]", got).group(1).split(", "):
        os.makedirs(os.path.dirname(missing), exist_ok=True)
        os.mkdir(missing) if missing.endswith("/val") else open(missing, "w").close()
    assert submit_py.missing_data({"name": name, "root": str(root)}) is None
    for name in ("synthetic", "digits"):  # generated, or shipped with scikit-learn
        assert submit_py.missing_data({"name": name, "root": str(tmp_path / "none")}) is None


def test_data_check_before_submitting(tmp_path, no_slurm, workdir):
    """A dataset that data.root lacks, as this host sees it, stops the submission (exit 2, nothing
    submitted); --dry-run checks too, since it shows what a submission would do; --no-data-check
    skips the check; with the files in place the same command passes."""
    root = tmp_path / "data"
    name, files, message = data_cases(str(root))[0]  # cifar10, one file missing
    for f in files:
        os.makedirs(os.path.dirname(f), exist_ok=True)
        open(f, "w").close()
    cmd = [*SUBMIT, "--config", str(workdir / "tiny.yaml"), *CPU_TASKS, f"data.name={name}", f"data.root={root}",
           f"run.out_dir={tmp_path}/runs", "--dry-run"]
    p = run(cmd, env=no_slurm, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.endswith(f"launch/submit.py: error: nothing submitted:\n  {message}  {DATA_HINT}\n"), p.stderr
    assert p.stdout == ""
    assert "#SBATCH --nodes=1\n" in run([*cmd, "--no-data-check"], env=no_slurm).stdout
    open(root / "cifar-10-batches-py" / "data_batch_1", "w").close()
    assert "#SBATCH --nodes=1\n" in run(cmd, env=no_slurm).stdout
    assert not os.path.exists(tmp_path / "runs")


def test_data_check_reports_every_sweep_point(tmp_path, no_slurm, workdir):
    """Every point whose data is missing, grouped by problem; points with their data pass."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "ds", "grid": {"data.name": ["synthetic", "svhn", "cifar10"],
                                                            "run.seed": [0, 1]}}))
    root = tmp_path / "data"
    root.mkdir()
    (root / "test_32x32.mat").touch()
    p = run([*SUBMIT, "--config", str(workdir / "tiny.yaml"), "--sweep", str(sweep), *CPU_TASKS, f"data.root={root}",
             f"run.out_dir={tmp_path}/runs"], env=no_slurm, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    cifar = ", ".join(f"{root}/cifar-10-batches-py/{n}" for n in
                      [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])
    assert p.stderr.endswith(
        "launch/submit.py: error: nothing submitted:\n"
        f"  sweep points name=svhn,seed=0; name=svhn,seed=1: dataset 'svhn' not found: missing {root}/train_32x32.mat. "
        f"To download it (needs internet), run: python -m imnet.download --dataset SVHN --root {root}\n"
        f"  sweep points name=cifar10,seed=0; name=cifar10,seed=1: dataset 'cifar10' not found: missing {cifar}. "
        f"To download it (needs internet), run: python -m imnet.download --dataset CIFAR10 --root {root}\n"
        f"  {DATA_HINT}\n"), p.stderr
    assert p.stdout == "" and not os.path.exists(tmp_path / "runs")
