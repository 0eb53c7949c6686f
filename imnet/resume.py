"""May this run continue from that checkpoint? Decided from the checkpoint's dict before any weight is
loaded: refused (ResumeError, naming the keys and what to set) when the saved state cannot continue
here, warned about when it can but the trajectory changes.

Refused: a model whose weights do not fit (model.norm=bn on a GN checkpoint), another optimizer, another
number of images per optimizer step or of steps per epoch (the saved position inside the epoch would
name other images), a checkpoint already past this run's last step.
Warned: every other key that changes what is trained, the world size, and run.epochs / run.max_steps
when they change the learning rate of a step still to come (cosine: always; step: only if a
milestone moves).
"""

from __future__ import annotations

from imnet import schedule
from imnet.config import ConfigError

# Keys that may change between a run and its resumption without changing what is trained.
HARMLESS = ("run.eval_every", "run.out_dir", "run.name", "data.root", "data.workers", "data.eval_batch_size",
            "ckpt", "log", "dist.timeout_s")
LENGTH = ("run.epochs", "run.max_steps")  # judged by what they do to the lr schedule
REFUSED = ("optim.name",)                 # the saved optimizer state belongs to another optimizer
START_AFRESH = "or start a new run (another run.name, or ckpt.resume=never)"


class ResumeError(ConfigError):
    pass


def _flat(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("dist.deepspeed_config",):
            yield from _flat(v, key + ".")
        else:
            yield key, v


def changed_keys(old: dict, new: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, this run's value), for every key outside HARMLESS that differs."""
    a, b = dict(_flat(old)), dict(_flat(new))
    out = {}
    for k in sorted(a.keys() | b.keys()):
        if any(k == h or k.startswith(h + ".") for h in HARMLESS):
            continue
        if a.get(k) != b.get(k):
            out[k] = (a.get(k), b.get(k))
    return out


def _settings(keys: dict[str, tuple]) -> str:
    return " ".join(f"{k}={v[0]}" for k, v in keys.items())


def _describe(keys: dict[str, tuple]) -> str:
    return ", ".join(f"{k} ({v[0]} -> {v[1]})" for k, v in keys.items())


def weight_mismatch(shapes: dict[str, tuple], saved: dict) -> str:
    """'' when the saved state dict has exactly this model's keys and shapes, else a short account."""
    missing = [k for k in shapes if k not in saved]
    extra = [k for k in saved if k not in shapes]
    wrong = [k for k in shapes if k in saved and tuple(saved[k].shape) != tuple(shapes[k])]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("of another shape", wrong)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    return ", ".join(parts)


def backend_mismatch(state: dict, path: str, deepspeed: bool) -> str:
    """'' when the checkpoint was written by this engine (DDP's single file, or DeepSpeed's sharded folder)."""
    if "deepspeed" in state and not deepspeed:
        return (f"cannot resume from {path}: it was written by dist.backend=deepspeed (its optimizer state is sharded "
                f"in a DeepSpeed folder); resume it with dist.backend=deepspeed, {START_AFRESH}")
    if "deepspeed" not in state and deepspeed:
        return (f"cannot resume from {path}: it was not written by dist.backend=deepspeed (it has no DeepSpeed "
                f"folder); resume it with the backend that wrote it, {START_AFRESH}")
    return ""


def check(state: dict, path: str, new_tree: dict, *, world: int, shapes: dict[str, tuple], global_batch: int,
          steps_per_epoch: int, total: int, lr_at) -> list[str]:
    """Raise ResumeError if `state` (a checkpoint's dict) cannot continue as this run; else the
    warnings to print. `lr_at(step, total)`: this run's schedule, for another total step count."""
    if why := backend_mismatch(state, path, new_tree["dist"]["backend"] == "deepspeed"):
        raise ResumeError(why)
    old_tree = state["config"]
    changed = changed_keys(old_tree, new_tree)
    model = {k: v for k, v in changed.items() if k.startswith("model.")}
    if bad := weight_mismatch(shapes, state["model"]):
        cause = f"{_describe(model)} changed since it was saved, and " if model else ""
        how = f"resume with {_settings(model)}, " if model else "resume with the model it was saved with, "
        raise ResumeError(f"cannot resume from {path}: {cause}its weights do not fit this model ({bad}); "
                          f"{how}{START_AFRESH}")
    if refused := {k: v for k, v in changed.items() if k in REFUSED}:
        raise ResumeError(f"cannot resume from {path}: {_describe(refused)} changed since it was saved, and its "
                          f"optimizer state belongs to the other optimizer; resume with {_settings(refused)}, "
                          f"{START_AFRESH}")
    old_world = state.get("world", world)
    o = old_tree
    old_gb = state.get("global_batch", o["data"]["batch_size"] * o["optim"]["accum_steps"] * old_world)
    old_spe = state.get("steps_per_epoch", steps_per_epoch)
    if (old_gb, old_spe) != (global_batch, steps_per_epoch):
        raise ResumeError(
            f"cannot resume from {path}: it was saved at step {state['pos']} of {old_spe} in epoch {state['epoch']}, "
            f"with {old_gb} images per optimizer step (data.batch_size={o['data']['batch_size']} x {old_world} ranks x "
            f"optim.accum_steps={o['optim']['accum_steps']}); this run has {global_batch} images per step and "
            f"{steps_per_epoch} steps per epoch, so that position would name other images. Resume with "
            f"data.batch_size x ranks x optim.accum_steps = {old_gb}"
            + (" and the same training set" if old_gb == global_batch else "") + f", {START_AFRESH}")
    step = state["step"]
    if step > total:
        length = _describe({k: v for k, v in changed.items() if k in LENGTH}) or "run.epochs, run.max_steps"
        raise ResumeError(f"cannot resume from {path}: it is at step {step}, past this run's last step {total} "
                          f"({length}); raise run.epochs or run.max_steps, {START_AFRESH}")
    warnings = []
    others = {k: v for k, v in changed.items() if k not in LENGTH}
    if others:
        warnings.append(f"{_describe(others)} changed since the checkpoint")
    if old_world != world:
        warnings.append(f"the world size changed ({old_world} -> {world} ranks, {global_batch} images per step as "
                        "before): batch statistics and the order of float sums differ")
    length = {k: v for k, v in changed.items() if k in LENGTH}
    old_total = state.get("total")
    if old_total is None and length:
        old_total = schedule.total_steps(steps_per_epoch, o["run"]["epochs"], o["run"]["max_steps"])
    if length and old_total != total:
        moved = next((s for s in range(step, min(old_total, total)) if lr_at(s, old_total) != lr_at(s, total)), None)
        if moved is not None:
            warnings.append(f"{_describe(length)} changed the learning rate schedule ({old_total} -> {total} steps): "
                            f"from step {moved + 1} on the lr differs from the saved run's ({lr_at(moved, total):.4g} "
                            f"instead of {lr_at(moved, old_total):.4g})")
    return warnings
