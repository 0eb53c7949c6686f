"""Train a model: `torchrun --nproc_per_node N imnet/train.py --config FILE [key.sub=value ...]`
(or `python -m imnet.train ...` for one process). The whole loop is `fit` below.

Kill it at any moment and run the same command again: it resumes from the newest complete
checkpoint, mid-epoch, on the same trajectory (ckpt.resume=auto).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as tdist
from torch.distributed.elastic.multiprocessing.errors import record

from imnet import atomic, checkpoint, config, dist, engine, fault, heartbeat, kernels, models, resume, schedule
from imnet import data as data_mod
from imnet.data.core import DataError
from imnet.evaluate import evaluate
from imnet.log import DONE, Logger, SinkError, Window


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM, SIGUSR1 and SIGUSR2 only set a flag; the loop all-reduces it, so every
    rank stops after the same step, and the checkpoint is written by the loop, never inside the
    handler. A second Ctrl-C raises KeyboardInterrupt at once (no checkpoint).
    `StopRequest.signum`: the last such signal this process got (launch/submit.py requeues on SIGUSR2)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    signum = None

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._set) for sig in self.SIGNALS}

    def _set(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        StopRequest.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @classmethod
    def ignore(cls) -> None:
        """After a stop, while the ranks leave: call before the last barrier. A launcher's SIGTERM to a rank
        still exiting (srun --kill-on-bad-exit, once a sibling exited 75) must not turn its 75 into a kill."""
        for sig in cls.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


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
    """Train `cfg` on this rank, in its run folder (locked while it runs); the result of the last validation."""
    run_dir = os.path.join(cfg.run.out_dir, cfg.run.name)
    lock = lock_run_dir(run_dir, d.is_main)
    try:
        return _fit(cfg, d, run_dir)
    finally:
        if lock is not None:
            lock.close()


def _fit(cfg: config.Config, d: dist.Dist, run_dir: str) -> dict:
    fault.trace_collectives(run_dir, d.rank)  # IMNET_TRACE_COLLECTIVES: off unless set (tests)
    seed_all(cfg.run.seed, cfg.run.deterministic)
    data = data_mod.build(cfg.data, d, seed=cfg.run.seed, channels_last=cfg.model.channels_last,
                          accum_steps=cfg.optim.accum_steps)
    model = models.from_config(cfg.model, data.info, batch_size=cfg.data.batch_size, world=d.world)
    eng = engine.build(cfg, model, d, run_dir)
    faults = fault.Injector(d.rank)  # IMNET_FAULT: off unless set (tests)
    ckpt = checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints"), cfg.ckpt.keep, d.is_main,
                                   wrap=faults.checkpoint_file)

    accum = cfg.optim.accum_steps
    spe = data.steps_per_epoch                      # optimizer steps per epoch
    total = schedule.total_steps(spe, cfg.run.epochs, cfg.run.max_steps)
    global_batch = cfg.data.batch_size * d.world * accum
    peak = schedule.peak_lr(cfg.optim.base_lr, global_batch, cfg.optim.lr_scaling)
    o = cfg.optim
    lr_at = lambda s, total=total: schedule.get_lr(  # noqa: E731
        s, peak=peak, steps_per_epoch=spe, total_steps=total, schedule=o.schedule, warmup_epochs=o.warmup_epochs,
        milestones=o.milestones, gamma=o.gamma, min_lr=o.min_lr)

    step = epoch = pos = bad_in_row = 0             # pos: optimizer steps done in this epoch
    found, err = None, None
    if d.is_main:  # one rank picks (it may set a damaged checkpoint aside), every rank loads that file
        try:
            found = ckpt.find_resume(cfg.ckpt.resume)
        except (OSError, checkpoint.CheckpointError) as e:
            err = e
    found, err = dist.broadcast_object((found, err))
    if err is not None:
        raise err
    resume_path = found
    if resume_path:  # every rank reads it; refused (ResumeError) or warned about before any weight is loaded
        state = checkpoint.load(resume_path)
        warnings = resume.check(state, resume_path, config.to_dict(cfg), world=d.world,
                                shapes=engine.shapes(eng.module), global_batch=global_batch, steps_per_epoch=spe,
                                total=total, lr_at=lr_at)
        step, epoch, pos, bad_in_row = state["step"], state["epoch"], state["pos"], state["bad_in_row"]
        if d.is_main:
            print(f"resumed from {resume_path} at step {step} (epoch {epoch}, step {pos} of {spe})", flush=True)
            for w in warnings:
                print(f"warning: resuming with {w}: the run will not follow the trajectory it would have had",
                      flush=True)
        eng.restore(state, resume_path)  # DeepSpeed reads its shards on every rank
        checkpoint.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        del state

    log = Logger(run_dir, d.is_main, cfg.log, total=total, initial=step)
    err = None
    if d.is_main:
        checkpoint.remove_file(os.path.join(run_dir, DONE))  # training on: not done until this attempt ends
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
    train_step = eng.train_step
    if cfg.run.cuda_graph:
        if why := engine.graph.reason_not(cfg, d):
            log.print(f"run.cuda_graph: {why}: the step runs eager")
        else:
            train_step = engine.GraphStep(eng, log=log.print)

    def sync_bn() -> None:
        if cfg.dist.sync_bn_stats:
            dist.average_buffers(eng.module)

    def check_streak() -> int:
        """Every rank: the current streak of non-finite steps (a read of the device); raises once a streak
        reached dist.max_nonfinite, at the step where it did."""
        streak, hit = meter.streak()
        if hit:
            abort(hit)
        return streak

    def abort(at: int):
        latest = ckpt.latest()
        raise FloatingPointError(
            f"{cfg.dist.max_nonfinite} non-finite losses in a row (dist.max_nonfinite={cfg.dist.max_nonfinite}) "
            f"at step {at}: lower optim.base_lr or check the data; "
            + (f"{latest} is the newest checkpoint, written before the streak" if latest else
               "no checkpoint was written before the streak"))

    def save() -> bool:
        """Every rank calls. Never from inside a non-finite streak: the last good checkpoint stays `latest`."""
        nonlocal bad_in_row
        bad_in_row = check_streak()
        if bad_in_row:
            return False
        if dist.all_reduce(engine.nonfinite_params(eng.module, d.device), "max").item():
            latest = ckpt.latest()
            raise FloatingPointError(
                f"non-finite weights at step {step} after finite losses (an overflow in the backward?): no "
                f"checkpoint written; lower optim.base_lr or set optim.grad_clip; "
                + (f"{latest} is the newest checkpoint" if latest else "no checkpoint was written yet"))
        hb.at(step, "checkpoint")
        sync_bn()
        rngs = dist.all_gather_object(checkpoint.rng_state())
        eng.save(ckpt, {"step": step, "epoch": epoch, "pos": pos, "bad_in_row": bad_in_row, "rng": rngs,  # every rank
                        "config": config.to_dict(cfg), "world": d.world, "global_batch": global_batch,
                        "steps_per_epoch": spe, "total": total}, step)
        dist.barrier()
        return True

    def validate() -> dict:
        hb.at(step, "eval")
        sync_bn()
        with eng.eval_module() as net:  # eng.module (DeepSpeed ZeRO-3: a copy with the gathered weights)
            res = evaluate(net, data.val, d.device, cfg.precision.amp)
        res["step"] = step
        log.log(split="val", epoch=epoch, **res)
        log.print(f"epoch {epoch} step {step}: val loss {res['loss']:.4f} top1 {res['top1']:.4f} "
                  f"top5 {res['top5']:.4f} (n={res['n']})")
        return res

    stop = StopRequest()
    hb = heartbeat.Heartbeat(run_dir, d.rank, d.world, cfg.dist.timeout_s)  # names a hung rank after timeout_s
    trace = fault.SampleTrace(run_dir, d.rank)  # IMNET_TRACE_SAMPLES: off unless set (tests)
    result: dict = {}
    win = Window(d.device)  # img/s and data wait since the last train record, without eval/checkpoint time
    logged_at, owed = step, False                  # owed: a checkpoint put off by a non-finite streak
    meter = engine.Meter(d.device, cfg.dist.max_nonfinite, step=step, streak=bad_in_row)  # on the device
    try:
        while step < total:
            data.train.sampler.set_epoch(epoch, start_batch=pos * accum)
            trace.start_epoch(data.train.sampler, accum * cfg.data.batch_size)
            with win.waiting():
                batches = iter(data.train)
            while pos < spe and step < total:
                hb.at(step, "data")
                with win.waiting():
                    micro = [next(batches) for _ in range(accum)]
                hb.at(step, "step")
                faults.before_step(step + 1, micro)
                out = train_step(micro, lr_at(step), stop.requested)  # queued on the device, not waited for
                meter.add(out)
                step, pos = step + 1, pos + 1
                trace.step(epoch, step)
                if step % cfg.log.every_steps == 0:  # the host reads the device here (and at checkpoints, eval)
                    r = meter.read()
                    win.images = r["images"]
                    w = win.read()
                    log.log(split="train", step=step, epoch=epoch, loss=r["loss"], top1=r["top1"], lr=lr_at(step - 1),
                            skipped=r["skipped"], **w)
                    log.progress(step - logged_at, loss=f"{r['loss']:.4f}", acc=f"{r['top1']:.3f}",
                                 img_s=f"{w['img_per_s']:.0f}")
                    logged_at, bad_in_row = step, r["streak"]
                    if r["hit"]:
                        abort(r["hit"])
                # a signal: checkpoint at this step boundary and leave, to be resumed. The flag is read one
                # step late (the same step on every rank), at the last step at once.
                if meter.stop_before() or (step == total and meter.stop_now()):
                    saved = save()
                    log.print(f"stopped by signal at step {step}; " + ("checkpoint saved" if saved else
                              f"no checkpoint: inside a streak of {bad_in_row} non-finite losses, the next run "
                              f"resumes from {ckpt.latest() or 'the start'}"))
                    notes = log.close(signum=StopRequest.signum or signal.SIGTERM)
                    return {"stopped": True, "step": step, "notes": notes}
                every = cfg.ckpt.every_steps and step % cfg.ckpt.every_steps == 0
                if (every or owed) and pos < spe and step < total:
                    with win.paused():
                        owed = not save()
            with win.paused():
                if pos >= spe:
                    epoch, pos = epoch + 1, 0
                    if cfg.run.eval_every and epoch % cfg.run.eval_every == 0:
                        result = validate()
                    if cfg.ckpt.epoch_end or step == total or owed:
                        owed = not save()
                else:  # stopped by run.max_steps mid-epoch
                    owed = not save()
        if result.get("step") != step:  # no validation yet at the final step
            result = validate()
    except BaseException as e:
        if d.world > 1 and lost_peer(e):  # a peer died or closed its connection: say which
            e = PeerError(f"{type(e).__name__}: {str(e).splitlines()[0]}; {hb.explain()}")
        for note in log.close(exit_code=1):  # e.g. how to upload the offline W&B run of the failed attempt
            log.print(note)
        raise e
    finally:
        stop.restore()
        hb.close()
    if owed:
        log.print(f"the run ended inside a streak of {bad_in_row} non-finite losses: no final checkpoint; "
                  f"{ckpt.latest()} is the newest")
    if d.is_main:
        done = json.dumps({"step": step, **result}) + "\n"
        atomic.write(os.path.join(run_dir, DONE), lambda f: f.write(done.encode()))
    result["notes"] = log.close()
    return result


class PeerError(RuntimeError):
    """A collective failed because another rank is gone; the message names it."""


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective's error about another rank (gloo's and NCCL's come as RuntimeError)."""
    if isinstance(e, tdist.DistError):
        return True
    text = str(e).lower()
    return type(e) is RuntimeError and any(w in text for w in ("gloo", "nccl", "by peer", "connection re"))


@record  # under torchrun: an uncaught error becomes the root cause in torchrun's summary
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="imnet.train", description="Train a model (see README).")
    config.add_cli(p)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config.load(a.config, a.overrides)
        fault.parse(os.environ.get(fault.ENV, ""))
    except (config.ConfigError, fault.FaultSpecError) as e:
        p.error(str(e))  # exit 2, before any process group exists
    d = dist.setup(cfg.dist)
    try:
        result = fit(cfg, d)
    # missing data or sink, a refused resume, a damaged checkpoint or data file, a setup only the data or the
    # world reveals (BN on one image per rank), a lost rank: one line that says what to do or which rank
    except (FileNotFoundError, SinkError, config.ConfigError, PeerError, checkpoint.CheckpointError, DataError) as e:
        dist.report_error(f"imnet.train: error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once
        dist.report_error("imnet.train: interrupted by a second Ctrl-C: nothing saved since the last checkpoint")
        sys.exit(130)
    if result.get("stopped"):
        StopRequest.ignore()
    dist.cleanup()  # after the sinks finished (W&B's finish must not wait on a torn-down group)
    if d.is_main and "top1" in result:
        print(f"final val top1 {result['top1']:.4f} top5 {result['top5']:.4f} loss {result['loss']:.4f} "
              f"(n={result['n']})", flush=True)
    for note in result.pop("notes", []) if d.is_main else []:  # e.g. the `wandb sync` command: the last line
        print(note, flush=True)
    if result.get("stopped"):
        sys.exit(dist.EXIT_STOPPED)  # not finished: the wrappers (sbatch template, submit.py, torchrun) must know
    return result


if __name__ == "__main__":
    main()
