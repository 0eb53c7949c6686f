"""Train on Slurm through submitit: one job, a sweep (job array), requeue on timeout/preemption.

    python launch/submit.py --config configs/r50_gn.yaml --nodes 4 --partition gpu [key.sub=value ...]
    python launch/submit.py --sweep configs/sweeps/cifar10_batch.yaml --array-parallelism 8
    python launch/submit.py --config configs/digits_gn.yaml --nodes 2 --dry-run   # print the sbatch script
    python launch/submit.py --config configs/digits_gn.yaml --nodes 2 --gpus-per-node 0 --tasks-per-node 2 --wait
    python launch/submit.py --config configs/digits_gn.yaml --local --gpus-per-node 0 --tasks-per-node 2
    python launch/submit.py ... --slurm mail-type=END --slurm dependency=afterok:123   # any other sbatch option

Before anything is submitted (also for --dry-run and --local): the config and overrides are
validated; each run's dataset must be where data.root says, seen from this host (--no-data-check
skips that, for data only the compute nodes see); and the checkpoint a run would resume from must
have been trained with the world size planned here (nodes x tasks per node): another would change
the steps per epoch, and so the run (a finished one would train further). Each Slurm task runs
`Trainer` below: one rank per task (one task per GPU), rendezvous at the first node of the job.

Preemption and timeouts: Slurm sends SIGUSR2 90 s before the time limit (`--signal=USR2@90`;
`scancel --signal=USR2 JOB` does the same by hand). imnet's loop catches it (train.StopRequest only
sets a flag), all ranks agree to stop after the same step, the loop writes a checkpoint and `fit`
returns {"stopped": True}. Only then does rank 0 hand over to submitit's own USR2 handler: it
calls `Trainer.checkpoint()` (a fresh Trainer with ckpt.resume=auto, no checkpoint path in the
pickle), dumps it as the job's pickle, counts a timeout against --max-requeues and runs
`scontrol requeue`. The requeued job resumes from runs/<name>/checkpoints/latest. Stopped by SIGTERM
or SIGUSR1 instead (scancel; a preemption Slurm requeues by itself), every task exits with status 75
(dist.EXIT_STOPPED, as `python -m imnet.train` does): the attempt checkpointed but did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import submitit

from imnet import config
from imnet.sweep import load_sweep, point_name, resolve_points

# partition, account, qos; used with fullmatch (`$` would let "gpu\n" through)
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*")
SLURM_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*[A-Za-z0-9]")  # sbatch's long option names
# --slurm keys that have an option here: `--slurm account=lab` is `--account lab`
SLURM_ALIASES = ("partition", "account", "qos", "constraint", "mem", "time", "job-name")
# sbatch options imnet writes itself, and how to change them
SLURM_OWNED = {
    "nodes": "use --nodes", "ntasks-per-node": "use --tasks-per-node (CPU tasks) or --gpus-per-node (a task per GPU)",
    "gpus-per-node": "use --gpus-per-node", "cpus-per-task": "use --cpus-per-task", "exclusive": "use --exclusive",
    "array": "--sweep makes the job array; --array-parallelism sets how many run at once",
    "signal": "USR2 90 s before the time limit makes every rank checkpoint before the job requeues",
    "requeue": "jobs requeue after a timeout or preemption (--max-requeues)",
    "open-mode": "logs are appended to across requeues", "output": "use --folder", "error": "use --folder",
}
# squeue reasons for which a pending job will not start unless it or the cluster's configuration changes
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed", "DependencyNeverSatisfied")
RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING")  # job states counted as running (the rest, unfinished: pending)


class Trainer:
    """The submitted callable: imnet's trainer in this task's process, checkpointable by submitit."""

    def __init__(self, tree: dict):
        self.tree = tree  # the resolved config as plain builtins

    def __call__(self) -> dict:
        from imnet import dist, train

        # torch's env:// variables for imnet.dist: rank, world, local rank from Slurm; the master is the
        # job's first node, on a port derived from the job id (not one inherited from the submitting
        # shell: array tasks sharing a node would collide); CUDA devices are picked by local rank
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if submitit.JobEnvironment().cluster == "local":
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        tree = self.tree
        if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0:  # requeued by Slurm itself (node failure, ...)
            tree = with_auto_resume(tree)
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's; imnet's StopRequest replaces it in fit
        cfg = config.from_dict(tree)
        d = dist.setup(cfg.dist)
        result = train.fit(cfg, d)
        if result.get("stopped"):
            train.StopRequest.ignore()
        usr2 = signal.SIGUSR2 in dist.all_gather_object(train.StopRequest.signum)  # any rank's signal counts
        dist.cleanup()  # every rank is past the checkpoint before anyone requeues
        if result.get("stopped"):  # checkpointed after a signal: this job attempt has no result
            print(f"stopped at step {result['step']}; the next attempt resumes from the latest checkpoint",
                  file=sys.stderr, flush=True)
            if usr2:
                if callable(requeue_handler):
                    requeue_handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + scontrol requeue + exit
                raise SystemExit(0)  # other ranks: a non-zero exit would make srun kill rank 0 mid-requeue
            # SIGTERM/SIGUSR1: Slurm requeues a preempted job itself, or the job was cancelled; either way
            # this attempt did not finish (dist.EXIT_STOPPED, as `python -m imnet.train` exits)
            raise SystemExit(dist.EXIT_STOPPED)
        if d.is_main:
            print(f"final {json.dumps(result)}", flush=True)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: resume from the latest checkpoint."""
        return submitit.helpers.DelayedSubmission(Trainer(with_auto_resume(self.tree)), *args, **kwargs)


def with_auto_resume(tree: dict) -> dict:
    return {**tree, "ckpt": {**tree.get("ckpt", {}), "resume": "auto"}}


def minutes(text: str) -> int:
    """--time: minutes ("90") or [D-]HH:MM:SS -> whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", text)
    total = int(text) if text.isdigit() else None
    if m:
        d, h, mi, s = (int(g or 0) for g in m.groups())
        total = -(-(((d * 24 + h) * 60 + mi) * 60 + s) // 60)
    if not total:
        raise ValueError(f"--time {text!r}: expected minutes (90) or HH:MM:SS (01:30:00), more than zero")
    return total


def resolve(path: str | None, overrides: list[str]) -> dict:
    """Validated config -> plain tree with absolute paths."""
    return absolute(config.to_dict(config.load(path, overrides)))


def absolute(tree: dict) -> dict:
    """The run folder and data root as absolute paths (jobs may start in another working directory)."""
    tree["run"]["out_dir"] = os.path.abspath(tree["run"]["out_dir"])
    tree["data"]["root"] = os.path.abspath(tree["data"]["root"])
    if tree["ckpt"]["resume"] not in ("auto", "never"):
        tree["ckpt"]["resume"] = os.path.abspath(tree["ckpt"]["resume"])
    return tree


def parse(argv):
    p = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.split("\n")[0])
    config.add_cli(p)
    g = p.add_argument_group("resources (one task per GPU; --gpus-per-node 0: CPU tasks)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, help="default 8 (--local: the GPUs this machine has)")
    g.add_argument("--tasks-per-node", type=int, help="CPU tasks per node with --gpus-per-node 0 (default 1)")
    g.add_argument("--cpus-per-task", type=int, help="default: data.workers + 1")
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--time", help="minutes or [D-]HH:MM:SS per job (default 1440)")
    for opt in ("partition", "account", "qos", "constraint"):
        g.add_argument(f"--{opt}")
    g.add_argument("--exclusive", action="store_true")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable: --slurm mail-type=END -> #SBATCH --mail-type=END "
                        "(KEY alone: a flag)")
    s = p.add_argument_group("submission")
    s.add_argument("--job-name", help="default: run.name (or the sweep's name)")
    s.add_argument("--folder", help="submitit's scripts and logs (default: <run folder>/slurm)")
    s.add_argument("--max-requeues", type=int, default=3, help="requeues after a timeout (preemptions do not count)")
    s.add_argument("--sweep", help="YAML: grid: {key.sub: [values]}, optional base: CONFIG, name: NAME")
    s.add_argument("--array-parallelism", type=int, help="sweep points running at once (default all)")
    s.add_argument("--local", action="store_true", help="submitit's local executor on this machine, no Slurm")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit; submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job(s), print their progress and results "
                   "(--local waits)")
    s.add_argument("--poll", type=float, default=30, help="seconds between progress checks while waiting (default 30)")
    s.add_argument("--no-data-check", action="store_true",
                   help="submit although data.root lacks the dataset here (for data only the compute nodes see)")
    a = p.parse_intermixed_args(argv)  # key=value before or after options
    a.sbatch = slurm_options(a, p)
    a.time = a.time or "1440"
    if a.gpus_per_node is None:
        import torch
        a.gpus_per_node = torch.cuda.device_count() if a.local else 8

    def check(ok, msg):
        if not ok:
            p.error(msg)
    check(a.nodes >= 1, f"--nodes must be at least 1 (got {a.nodes})")
    check(a.gpus_per_node >= 0, f"--gpus-per-node must be 0 or more (got {a.gpus_per_node})")
    check(a.tasks_per_node is None or a.tasks_per_node >= 1,
          f"--tasks-per-node must be at least 1 (got {a.tasks_per_node})")
    check(not (a.gpus_per_node and a.tasks_per_node not in (None, a.gpus_per_node)),
          f"--tasks-per-node {a.tasks_per_node} with --gpus-per-node {a.gpus_per_node}: one task per GPU")
    check(a.cpus_per_task is None or a.cpus_per_task >= 1,
          f"--cpus-per-task must be at least 1 (got {a.cpus_per_task})")
    check(a.max_requeues >= 0, f"--max-requeues must be 0 or more (got {a.max_requeues})")
    for opt in ("partition", "account", "qos"):
        v = getattr(a, opt)
        check(v is None or NAME_RE.fullmatch(v),
              f"--{opt} {v!r}: use letters, digits, '_', '.', '-' (several: comma-separated)")
    check(a.mem is None or re.fullmatch(r"\d+[KMGT]?", a.mem), f"--mem {a.mem!r}: expected a size such as 64G or 4000M")
    for opt in ("constraint", "job_name", "folder"):  # --folder: the #SBATCH --output/--error paths
        v = getattr(a, opt)
        check(v is None or not config.CONTROL_RE.search(v), f"--{opt.replace('_', '-')} {v!r}: no control characters")
    check(a.poll > 0, f"--poll must be more than 0 seconds (got {a.poll})")
    try:
        a.minutes = minutes(a.time)
    except ValueError as e:
        p.error(str(e))
    if a.local:
        for opt in ("partition", "account", "qos", "constraint", "mem"):
            check(getattr(a, opt) is None, f"--{opt} is a Slurm option: not with --local")
        check(not a.sbatch, "--slurm options are for Slurm: not with --local")
        check(not a.exclusive, "--exclusive is a Slurm option: not with --local")
        check(not a.dry_run, "--dry-run prints an sbatch script: not with --local")
        check(a.nodes == 1, f"--local runs on this machine: --nodes must be 1 (got {a.nodes})")
    check(a.sweep or a.array_parallelism is None, "--array-parallelism is for --sweep")
    check(a.array_parallelism is None or a.array_parallelism >= 1, "--array-parallelism must be at least 1")

    # runs: [(sweep point {key: value} or None, resolved config tree)]
    try:
        if not a.sweep:
            a.name, runs = None, [(None, resolve(a.config, a.overrides))]
        else:
            sw = load_sweep(a.sweep)
            a.name = sw.name
            runs = [(point, absolute(config.to_dict(cfg))) for point, cfg in resolve_points(sw, a.config, a.overrides)]
    except (config.ConfigError, ValueError) as e:
        p.error(str(e))
    a.tasks = a.gpus_per_node or a.tasks_per_node or 1  # per node
    problems = preflight(a, runs)
    if problems:
        p.error("nothing submitted:\n  " + "\n  ".join(problems))
    return a, runs


def slurm_options(a, p) -> dict:
    """--slurm KEY=VALUE items -> {key: value, or True for a flag}; keys with an option here set that option."""
    out = {}
    for item in a.slurm:
        key, eq, value = item.partition("=")
        if not SLURM_KEY_RE.fullmatch(key):
            dashed = key.replace("_", "-")
            hint = f" (sbatch spells it {dashed})" if SLURM_KEY_RE.fullmatch(dashed) else ""
            p.error(f"--slurm {item!r}: expected KEY=VALUE (or KEY alone, a flag) with KEY an sbatch long option "
                    f"name (letters, digits, '-'), e.g. mail-type=END{hint}")
        if (eq and not value) or config.CONTROL_RE.search(value):
            p.error(f"--slurm {item!r}: the value must be non-empty, without control characters (a newline "
                    "would break the batch script)")
        if key in SLURM_OWNED:
            p.error(f"--slurm {key}: imnet sets this sbatch option itself: {SLURM_OWNED[key]}")
        if key in out:
            p.error(f"--slurm {key} given twice")
        out[key] = value if eq else True
    for key in SLURM_ALIASES:
        if key in out:
            value, attr = out.pop(key), key.replace("-", "_")
            if getattr(a, attr) is not None:
                p.error(f"--slurm {key}={value} and --{key} {getattr(a, attr)}: give one")
            if value is True:
                p.error(f"--slurm {key}: needs a value (--slurm {key}=VALUE)")
            setattr(a, attr, value)
    return out


def preflight(a, runs) -> list[str]:
    """What would make the runs fail at their start: missing data, a checkpoint of another world size."""
    found: dict[str, list] = {}  # problem -> the sweep points (None: the one run) that have it
    for point, tree in runs:
        for problem in (world_change(tree, a), None if a.no_data_check else missing_data(tree["data"])):
            if problem:
                found.setdefault(problem, []).append(point)
    out = [(f"sweep point{'s' * (len(points) > 1)} {'; '.join(map(point_name, points))}: " if points[0] else "")
           + msg for msg, points in found.items()]
    if any(msg.startswith("dataset ") for msg in found):
        out.append("(data is looked for on this host; --no-data-check skips that, for data only the compute nodes see)")
    return out


def world_change(tree: dict, a) -> str | None:
    """Why the checkpoint this run would resume from does not fit the planned world size; None if it does."""
    resume, run_dir = tree["ckpt"]["resume"], os.path.join(tree["run"]["out_dir"], tree["run"]["name"])
    if resume == "never" or (resume == "auto" and not os.path.isdir(os.path.join(run_dir, "checkpoints"))):
        return None
    import torch

    from imnet import checkpoint

    warned: list[str] = []  # a damaged checkpoint: the job sets it aside and takes the one before; said here too
    try:
        path = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), is_main=False,
                                       warn=warned.append).find_resume(resume, set_aside=False)
    except (OSError, checkpoint.CheckpointError) as e:  # ckpt.resume=PATH: the job would stop on it
        return f"{run_dir} would resume from {resume}, which cannot be used: {e}"
    for w in warned:
        print(w, file=sys.stderr)
    if path is None or not os.path.isfile(path):
        return None
    try:  # mmap: only the small entries are read
        old = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("world")
    except Exception as e:  # the run would fail on it the same way
        return f"{run_dir} would resume from {path}, which cannot be read: {type(e).__name__}: {e}"
    if old in (None, a.nodes * a.tasks):
        return None
    return (f"{run_dir} would resume from {path}, which was trained with world size {old}; this submission plans "
            f"{a.nodes * a.tasks} ({a.nodes} node(s) x {a.tasks} task(s)): steps per epoch, and so the total steps, "
            f"would change (a finished run would train further). Ask for {old} tasks in all (--nodes x "
            "--tasks-per-node, or x --gpus-per-node), or give another run.name, or ckpt.resume=never to train it "
            "again from scratch")


def missing_data(data: dict) -> str | None:
    """Why data.name's files are not under data.root, as seen from this host (presence only); None if there."""
    name, root, join = data["name"], data["root"], os.path.join
    # the layouts: README "Where the files must be"; synthetic is generated, digits ships with scikit-learn, and
    # a dataset not named here is left to the job to report
    if name not in ("mnist", "fashion", "cifar10", "svhn", "imagenet", "tiny_imagenet", "h5"):
        return None
    from imnet.data import datasets as ds

    if name in ds.DOWNLOAD_NAMES:
        missing = [f for split in ds.SPLITS for f in ds.expected_files(name, root, split) if not os.path.isfile(f)]
        hint = (f"To download it (needs internet), run: python -m imnet.download --dataset {ds.DOWNLOAD_NAMES[name]} "
                f"--root {root}")
    elif name == "imagenet":
        missing = [join(root, split) for split in ds.SPLITS if not os.path.isdir(join(root, split))]
        hint = ds.IMAGENET_HELP.format(root=root)
    elif name == "tiny_imagenet":
        needed = [join(root, "wnids.txt"), join(root, "train"), join(root, "val", "val_annotations.txt")]
        missing = [f for f in needed if not os.path.exists(f)]
        hint = f"Download {ds.TINY_IMAGENET_URL} and unzip it; data.root is its tiny-imagenet-200 folder."
    else:  # h5: train.h5 + val.h5, or data.hdf5 (or data.hy) + id.txt in train/ and val/, or in root
        from imnet.data import h5

        def old(folder):
            data_file = any(os.path.isfile(join(folder, n)) for n in h5.OLD_DATA_NAMES)
            return [join(folder, "data.hdf5")] * (not data_file) + [join(folder, "id.txt")] * (
                not os.path.isfile(join(folder, "id.txt")))
        if os.path.isfile(join(root, "train.h5")):
            missing = [f for f in [join(root, "val.h5")] if not os.path.isfile(f)]
        elif os.path.isdir(join(root, "train")):
            missing = old(join(root, "train")) + old(join(root, "val"))
        else:
            missing = old(root)
        hint = h5.HELP.format(root=root)
    missing = list(dict.fromkeys(missing))  # the torchvision sets need the same files for both splits
    return f"dataset {name!r} not found: missing {', '.join(missing)}. {hint}" if missing else None


def make_executor(a, folder: str, n_runs: int, workers: int):
    if a.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=a.max_requeues)
        ex.update_parameters(timeout_min=a.minutes, tasks_per_node=a.tasks, gpus_per_node=a.gpus_per_node, nodes=1)
        return ex
    cls = submitit.SlurmExecutor
    if a.dry_run:  # render the script without srun/sbatch on this machine
        cls = type("PreviewExecutor", (submitit.SlurmExecutor,), {"affinity": classmethod(lambda c: 2)})
    ex = cls(folder, max_num_timeout=a.max_requeues)
    opts = {"partition": a.partition, "account": a.account, "qos": a.qos, "constraint": a.constraint, "mem": a.mem,
            "gpus_per_node": a.gpus_per_node or None, "exclusive": a.exclusive or None}
    ex.update_parameters(job_name=a.job_name, time=a.minutes, nodes=a.nodes, ntasks_per_node=a.tasks,
                         cpus_per_task=a.cpus_per_task or workers + 1, array_parallelism=a.array_parallelism or n_runs,
                         srun_args=["--kill-on-bad-exit=1"], additional_parameters={"requeue": True, **a.sbatch},
                         **{k: v for k, v in opts.items() if v is not None})
    if a.dry_run and n_runs > 1:
        ex.parameters["map_count"] = n_runs  # what submitit sets for a job array
    return ex


def main(argv=None) -> int:
    a, runs = parse(sys.argv[1:] if argv is None else argv)
    first = runs[0][1]["run"]
    root = os.path.join(first["out_dir"], a.name or first["name"])  # the run folder, or the sweep's folder
    a.job_name = a.job_name or a.name or first["name"]
    folder = os.path.abspath(a.folder or os.path.join(root, "slurm"))
    ex = make_executor(a, folder, len(runs), max(r["data"]["workers"] for _, r in runs))
    if a.dry_run:
        print(ex._make_submission_file_text(ex._submitit_command_str, "dry-run"))
        for _, tree in runs:
            print(f"# would run {os.path.join(tree['run']['out_dir'], tree['run']['name'])}")
        return 0
    with ex.batch():
        jobs = [ex.submit(Trainer(tree)) for _, tree in runs]
    where = "on this machine (submitit local executor)" if a.local else "to Slurm"
    if a.sweep:
        array = "" if a.local else f" as job array {jobs[0].job_id.split('_')[0]}"
        print(f"submitted {len(jobs)} runs of sweep {a.name} {where}{array}, run folders in {root}:")
        table = [["job", *runs[0][0], "run folder"]]
        table += [[j.job_id, *map(str, point.values()), tree["run"]["name"].split("/", 1)[1]]
                  for j, (point, tree) in zip(jobs, runs)]
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    else:
        print(f"submitted job {jobs[0].job_id} {where}: run folder {root}")
    for j in jobs:
        print(f"  logs {j.job_id}: {j.paths.stdout} {j.paths.stderr}")
    print(f"follow: tail -f {jobs[0].paths.stdout} {jobs[0].paths.stderr}", flush=True)
    if not (a.wait or a.local):
        return 0
    errors = follow(a, jobs, f"sweep {a.name}" if a.sweep else f"job {jobs[0].job_id}")
    for j in jobs:
        if errors[j.job_id]:
            print(f"job {j.job_id} failed: {errors[j.job_id]}", file=sys.stderr, flush=True)
        else:
            print(f"job {j.job_id} done: {json.dumps(j.results()[0])}", flush=True)
    return 1 if any(errors.values()) else 0


def follow(a, jobs, label: str) -> dict:
    """Until every job has ended, print how many run, are done, failed or wait, whenever that changes,
    and (Slurm) any job that Slurm keeps pending for a reason it will not overcome by waiting.
    Returns {job id: its exception, None if it succeeded}."""
    errors: dict = {}
    last, warned = None, set()
    while True:
        if not a.local:
            jobs[0].watcher.update()  # one sacct call for every job; states below read its answer
        states = []
        for j in jobs:
            if j.job_id not in errors and j.done():
                errors[j.job_id] = j.exception()  # None when every task returned
            if j.job_id in errors:
                states.append("failed" if errors[j.job_id] else "done")
            else:
                states.append("running" if j.state.split()[0] in RUNNING else "pending")
        counts = ", ".join(f"{states.count(s)} {s}" for s in ("running", "done", "failed", "pending"))
        if counts != last:
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {counts}", flush=True)
            last = counts
        if "pending" in states and not a.local:
            for jid, reason in stuck(jobs):
                if (jid, reason) not in warned:
                    warned.add((jid, reason))
                    print(f"[{time.strftime('%H:%M:%S')}] job {jid} pending with reason {reason}: Slurm will not "
                          f"start it as submitted (scontrol show job {jid} says what it asks for; scancel {jid})",
                          flush=True)
        if len(errors) == len(jobs):
            return errors
        time.sleep(a.poll)


def stuck(jobs) -> list[tuple[str, str]]:
    """(job id, reason) of the pending jobs whose squeue reason means they will not start as they are."""
    ids = ",".join(sorted({j.job_id.split("_")[0] for j in jobs}))
    out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r", "-j", ids], capture_output=True, text=True,
                         check=False)  # a job Slurm has forgotten: no row
    rows = [line.split(None, 1) for line in out.stdout.splitlines()]
    return [(row[0], row[1]) for row in rows if len(row) == 2 and row[1] in NEVER_STARTS]


if __name__ == "__main__":
    sys.exit(main())
