"""Train a model: `torchrun --nproc_per_node N imnet/train.py --config FILE [key.sub=value ...]`
(or `python -m imnet.train ...` for one process). The whole loop is `fit` below.

Kill it at any moment and run the same command again: it resumes from the newest complete
checkpoint, mid-epoch, on the same trajectory (ckpt.resume=auto).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

import torch

from imnet import checkpoint, config, dist, engine, kernels, models, schedule
from imnet import data as data_mod
from imnet.evaluate import evaluate
from imnet.log import DONE, Logger, SinkError


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGUSR2 only set a flag; the loop all-reduces it, so every rank stops after
    the same step, and the checkpoint is written by the loop, never inside the handler.
    `StopRequest.signum`: the last such signal this process got (launch/submit.py requeues on SIGUSR2)."""

    signum = None

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True
        StopRequest.signum = signum


def seed_all(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # same on every rank: identical initial weights
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def lock_run_dir(run_dir: str, is_main: bool):
    """Two runs writing one run folder would corrupt each other's checkpoints: rank 0 holds an
    flock on `run_dir/.lock` (the kernel drops it when the process dies, even by SIGKILL)."""
    import fcntl

    err, fh = None, None
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        fh = open(os.path.join(run_dir, ".lock"), "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = f"run folder {run_dir} is in use by another run (choose another run.name, or stop that run)"
    err = dist.broadcast_object(err)
    if err:
        raise RuntimeError(err)
    return fh


def fit(cfg: config.Config, d: dist.Dist) -> dict:
    run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
    lock = lock_run_dir(run_dir, d.is_main)  # noqa: F841 - held until the process exits
    seed_all(cfg.run.seed, cfg.run.deterministic)
    data = data_mod.build(cfg, d)
    model = models.from_config(cfg.model, data.info, batch_size=cfg.data.batch_size, world=d.world)
    eng = engine.build(cfg, model, d, run_dir)
    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.ckpt.keep, d.is_main)

    accum = cfg.optim.accum_steps
    spe = data.steps_per_epoch                      # optimizer steps per epoch
    total = spe * cfg.run.epochs if cfg.run.max_steps is None else min(cfg.run.max_steps, spe * cfg.run.epochs)
    global_batch = cfg.data.batch_size * d.world * accum
    peak = schedule.peak_lr(cfg.optim.base_lr, global_batch, cfg.optim.lr_scaling)
    o = cfg.optim
    lr_at = lambda s: schedule.get_lr(s, peak=peak, steps_per_epoch=spe, total_steps=total, schedule=o.schedule,  # noqa: E731
                                      warmup_epochs=o.warmup_epochs, milestones=o.milestones, gamma=o.gamma, min_lr=o.min_lr)

    step = epoch = pos = bad_in_row = 0             # pos: optimizer steps done in this epoch
    resume_path = ckpt.find_resume(cfg.ckpt.resume)
    if resume_path:
        state = eng.load(resume_path)  # every rank (DeepSpeed reads its shards on each)
        step, epoch, pos, bad_in_row = state["step"], state["epoch"], state["pos"], state["bad_in_row"]
        checkpoint.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])

    log = Logger(run_dir, d.is_main, cfg.log, total=total, initial=step)
    err = None
    if d.is_main:
        _remove(os.path.join(run_dir, DONE))  # training on: not done until this attempt ends
        try:
            log.start(config.to_dict(cfg), {"world": d.world, "launcher": d.launcher, "device": str(d.device),
                                            "global_batch": global_batch, "peak_lr": peak, "steps": total})
        except SinkError as e:
            err = str(e)
    if err := dist.broadcast_object(err):  # every rank stops, not only the one with the sinks
        log.close(exit_code=1)
        raise SinkError(err)
    if note := kernels.gpu_note(eng.module, d.device):  # a GPU Triton does not support: which GroupNorm runs
        log.print(note)
    if resume_path:
        log.print(f"resumed from {resume_path} at step {step} (epoch {epoch}, step {pos} of {spe})")
        changed = trajectory_changes(state["config"], config.to_dict(cfg), state.get("world"), d.world)
        if changed:
            log.print(f"warning: resuming with {', '.join(changed)} changed since the checkpoint: "
                      "the run will not follow the trajectory it would have had")

    def sync_bn() -> None:
        if cfg.dist.sync_bn_stats:
            dist.average_buffers(eng.module)

    def save() -> None:
        sync_bn()
        rngs = dist.all_gather_object(checkpoint.rng_state())
        eng.save(ckpt, {"step": step, "epoch": epoch, "pos": pos, "bad_in_row": bad_in_row,  # every rank
                        "rng": rngs, "config": config.to_dict(cfg), "world": d.world}, step)
        dist.barrier()

    def validate() -> dict:
        sync_bn()
        with eng.eval_module() as net:  # eng.module (DeepSpeed ZeRO-3: a copy with the gathered weights)
            res = evaluate(net, data.val, d.device, cfg.precision.amp)
        res["step"] = step
        log.log(split="val", epoch=epoch, **res)
        log.print(f"epoch {epoch} step {step}: val loss {res['loss']:.4f} top1 {res['top1']:.4f} "
                  f"top5 {res['top5']:.4f} (n={res['n']})")
        return res

    stop = StopRequest()
    result: dict = {}
    win = Window(d.device)  # img/s and data wait since the last train record, without eval/checkpoint time
    logged_at = step
    try:
        while step < total:
            data.train.sampler.set_epoch(epoch, start_batch=pos * accum)
            with win.waiting():
                batches = iter(data.train)
            while pos < spe and step < total:
                with win.waiting():
                    micro = [next(batches) for _ in range(accum)]
                out = eng.train_step(micro, lr_at(step), stop.requested)
                step, pos = step + 1, pos + 1
                bad_in_row = bad_in_row + 1 if out.skipped else 0
                win.images += out.images
                if step % cfg.log.every_steps == 0 or out.skipped:
                    w = win.read()
                    log.log(split="train", step=step, epoch=epoch, loss=out.loss, top1=out.top1, lr=lr_at(step - 1),
                            skipped=out.skipped, **w)
                    log.progress(step - logged_at, loss=f"{out.loss:.4f}", acc=f"{out.top1:.3f}",
                                 img_s=f"{w['img_per_s']:.0f}")
                    logged_at = step
                if bad_in_row >= cfg.dist.max_nonfinite:
                    raise FloatingPointError(f"{bad_in_row} non-finite losses in a row (dist.max_nonfinite="
                                             f"{cfg.dist.max_nonfinite}) at step {step}: lower optim.base_lr or check the data")
                if out.stop:  # a signal: checkpoint at this step boundary and leave, to be resumed
                    save()
                    log.print(f"stopped by signal at step {step}; checkpoint saved")
                    return {"stopped": True, "step": step, "notes": log.close(signum=StopRequest.signum or signal.SIGTERM)}
                if cfg.ckpt.every_steps and step % cfg.ckpt.every_steps == 0 and pos < spe and step < total:
                    with win.paused():
                        save()
            with win.paused():
                if pos == spe:
                    epoch, pos = epoch + 1, 0
                    if cfg.run.eval_every and epoch % cfg.run.eval_every == 0:
                        result = validate()
                    if cfg.ckpt.epoch_end or step == total:
                        save()
                else:  # stopped by run.max_steps mid-epoch
                    save()
        if result.get("step") != step:  # no validation yet at the final step
            result = validate()
    except BaseException:
        for note in log.close(exit_code=1):  # e.g. how to upload the offline W&B run of the failed attempt
            log.print(note)
        raise
    if d.is_main:
        done = json.dumps({"step": step, **result}) + "\n"
        checkpoint.atomic_write(os.path.join(run_dir, DONE), lambda f: f.write(done.encode()))
    result["notes"] = log.close()
    return result


class Window:
    """Throughput since the last train record: global img/s over the time spent training (validation
    and checkpoints excluded) and the share of that time spent waiting for the loader."""

    def __init__(self, device: torch.device):
        self.device, self.images = device, 0
        self.t0, self.excluded, self.wait = _now(device), 0.0, 0.0

    @contextlib.contextmanager
    def waiting(self):
        t = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t

    @contextlib.contextmanager
    def paused(self):
        t = _now(self.device)
        yield
        self.excluded += _now(self.device) - t

    def read(self) -> dict:
        """The window's figures (and starts the next window)."""
        t = _now(self.device)
        busy = max(t - self.t0 - self.excluded, 1e-9)
        out = {"img_per_s": self.images / busy, "data_wait": min(self.wait / busy, 1.0)}
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.images, self.t0, self.excluded, self.wait = 0, t, 0.0, 0.0
        return out


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# Keys that may change between a run and its resumption without changing what is trained.
_HARMLESS = {"run.epochs", "run.max_steps", "run.eval_every", "run.out_dir", "run.name", "data.root",
             "data.workers", "data.eval_batch_size", "ckpt", "log", "dist.timeout_s"}


def trajectory_changes(old: dict, new: dict, old_world, new_world) -> list[str]:
    """Dotted keys (and the world size) that differ between a checkpoint's config and this run's."""
    def flat(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if key in _HARMLESS:
                continue
            if isinstance(v, dict):
                yield from flat(v, key + ".")
            else:
                yield key, v
    a, b = dict(flat(old)), dict(flat(new))
    out = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if old_world is not None and old_world != new_world:
        out.append(f"world size ({old_world} -> {new_world})")
    return out


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="imnet.train", description="Train a model (see README).")
    config.add_cli(p)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config.load(a.config, a.overrides)
    except config.ConfigError as e:
        p.error(str(e))  # exit 2, before any process group exists
    d = dist.setup(cfg.dist)
    try:
        result = fit(cfg, d)
    except (FileNotFoundError, SinkError, config.ConfigError) as e:  # missing data or sink, or a setup only
        # the data or the world reveals (BN on one image per rank): the message says what to do
        print(f"imnet.train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    dist.cleanup()  # after the sinks finished (W&B's finish must not wait on a torn-down group)
    if d.is_main and "top1" in result:
        print(f"final val top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f} "
              f"(n={result['n']})", flush=True)
    for note in result.pop("notes", []) if d.is_main else []:  # e.g. the `wandb sync` command: the last line
        print(note, flush=True)
    return result


if __name__ == "__main__":
    main()
