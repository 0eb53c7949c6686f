"""Train on Slurm through submitit: one job, a sweep (job array), requeue on timeout/preemption.

    python launch/submit.py --config configs/r50_gn.yaml --nodes 4 --partition gpu [key.sub=value ...]
    python launch/submit.py --sweep configs/sweeps/cifar10_batch.yaml --array-parallelism 8
    python launch/submit.py --config configs/digits_gn.yaml --nodes 2 --dry-run   # print the sbatch script
    python launch/submit.py --config configs/digits_gn.yaml --local --gpus-per-node 0 --tasks-per-node 2

The config and overrides are validated here, before anything is submitted. Each Slurm task runs
`Trainer` below: one rank per task (one task per GPU), rendezvous at the first node of the job.

Preemption and timeouts: Slurm sends SIGUSR2 90 s before the time limit (`--signal=USR2@90`;
`scancel --signal=USR2 JOB` does the same by hand). imnet's loop catches it (train.StopRequest only
sets a flag), all ranks agree to stop after the same step, the loop writes a checkpoint and `fit`
returns {"stopped": True}. Only then does rank 0 hand over to submitit's own USR2 handler: it
calls `Trainer.checkpoint()` (a fresh Trainer with ckpt.resume=auto, no checkpoint path in the
pickle), dumps it as the job's pickle, counts a timeout against --max-requeues and runs
`scontrol requeue`. The requeued job resumes from runs/<name>/checkpoints/latest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys

import submitit
import yaml

from imnet import config
from imnet.sweep import load_sweep, resolve_points

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*$")  # partition, account, qos


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
        usr2 = signal.SIGUSR2 in dist.all_gather_object(train.StopRequest.signum)  # any rank's signal counts
        dist.cleanup()  # every rank is past the checkpoint before anyone requeues
        if result.get("stopped"):  # checkpointed after a signal: this job attempt has no result
            if usr2 and callable(requeue_handler):
                requeue_handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + scontrol requeue + exit
            # SIGTERM/SIGUSR1: Slurm requeues a preempted job itself, or the job was cancelled
            print(f"stopped at step {result['step']}; the next attempt resumes from the latest checkpoint",
                  file=sys.stderr, flush=True)
            raise SystemExit(0)
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
    g.add_argument("--time", default="1440", help="minutes or [D-]HH:MM:SS per job (default 1440)")
    for opt in ("partition", "account", "qos", "constraint"):
        g.add_argument(f"--{opt}")
    g.add_argument("--exclusive", action="store_true")
    s = p.add_argument_group("submission")
    s.add_argument("--job-name", help="default: run.name (or the sweep's name)")
    s.add_argument("--folder", help="submitit's scripts and logs (default: <run folder>/slurm)")
    s.add_argument("--max-requeues", type=int, default=3, help="requeues after a timeout (preemptions do not count)")
    s.add_argument("--sweep", help="YAML: grid: {key.sub: [values]}, optional base: CONFIG, name: NAME")
    s.add_argument("--array-parallelism", type=int, help="sweep points running at once (default all)")
    s.add_argument("--local", action="store_true", help="submitit's local executor on this machine, no Slurm")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script and exit; submit nothing")
    s.add_argument("--wait", action="store_true", help="wait for the job(s) and print the results (--local waits)")
    a = p.parse_args(argv)
    if a.gpus_per_node is None:
        import torch
        a.gpus_per_node = torch.cuda.device_count() if a.local else 8

    def check(ok, msg):
        if not ok:
            p.error(msg)
    check(a.nodes >= 1, f"--nodes must be at least 1 (got {a.nodes})")
    check(a.gpus_per_node >= 0, f"--gpus-per-node must be 0 or more (got {a.gpus_per_node})")
    check(a.tasks_per_node is None or a.tasks_per_node >= 1, f"--tasks-per-node must be at least 1 (got {a.tasks_per_node})")
    check(not (a.gpus_per_node and a.tasks_per_node not in (None, a.gpus_per_node)),
          f"--tasks-per-node {a.tasks_per_node} with --gpus-per-node {a.gpus_per_node}: one task per GPU")
    check(a.cpus_per_task is None or a.cpus_per_task >= 1, f"--cpus-per-task must be at least 1 (got {a.cpus_per_task})")
    check(a.max_requeues >= 0, f"--max-requeues must be 0 or more (got {a.max_requeues})")
    for opt in ("partition", "account", "qos"):
        v = getattr(a, opt)
        check(v is None or NAME_RE.match(v), f"--{opt} {v!r}: use letters, digits, '_', '.', '-' (several: comma-separated)")
    check(a.mem is None or re.fullmatch(r"\d+[KMGT]?", a.mem), f"--mem {a.mem!r}: expected a size such as 64G or 4000M")
    try:
        a.minutes = minutes(a.time)
    except ValueError as e:
        p.error(str(e))
    if a.local:
        for opt in ("partition", "account", "qos", "constraint", "mem"):
            check(getattr(a, opt) is None, f"--{opt} is a Slurm option: not with --local")
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
    return a, runs


def make_executor(a, folder: str, n_runs: int, workers: int):
    tasks = a.gpus_per_node or a.tasks_per_node or 1
    if a.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=a.max_requeues)
        ex.update_parameters(timeout_min=a.minutes, tasks_per_node=tasks, gpus_per_node=a.gpus_per_node, nodes=1)
        return ex
    cls = submitit.SlurmExecutor
    if a.dry_run:  # render the script without srun/sbatch on this machine
        cls = type("PreviewExecutor", (submitit.SlurmExecutor,), {"affinity": classmethod(lambda c: 2)})
    ex = cls(folder, max_num_timeout=a.max_requeues)
    opts = dict(partition=a.partition, account=a.account, qos=a.qos, constraint=a.constraint, mem=a.mem,
                gpus_per_node=a.gpus_per_node or None, exclusive=a.exclusive or None)
    ex.update_parameters(job_name=a.job_name, time=a.minutes, nodes=a.nodes, ntasks_per_node=tasks,
                         cpus_per_task=a.cpus_per_task or workers + 1, array_parallelism=a.array_parallelism or n_runs,
                         srun_args=["--kill-on-bad-exit=1"], additional_parameters={"requeue": True},
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
    failed = 0
    for j in jobs:
        try:
            result = j.results()[0]
            print(f"job {j.job_id} done: {json.dumps(result)}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every job, then fail
            failed += 1
            print(f"job {j.job_id} failed: {e}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
