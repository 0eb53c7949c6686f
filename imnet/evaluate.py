"""Top-1/top-5 of a model on the validation split, every image counted exactly once over all ranks.

    python -m imnet.evaluate --checkpoint runs/digits_gn/checkpoints/latest [key.sub=value ...]
    torchrun --nproc_per_node 2 -m imnet.evaluate --checkpoint ... data.root=/other/copy

Uses the checkpoint's own config; overrides apply on top (another data root, batch size, ...).
Prints one JSON line: {"top1": ..., "top5": ..., "loss": ..., "n": ..., "step": ..., "checkpoint": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from imnet import checkpoint, config, dist
from imnet.data.core import DataError
from imnet.engine import autocast


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> dict:
    was_training = model.training
    model.eval()
    # [loss sum, top-1 correct, top-5 correct, images] summed over this rank's shard, then all ranks
    acc = torch.zeros(4, dtype=torch.float64, device=device)
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        count = torch.tensor(float(y.numel()), device=device, dtype=torch.float64)
        acc += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                            hit.any(1).sum().double(), count])
    dist.all_reduce(acc)
    model.train(was_training)
    loss, c1, c5, n = acc.tolist()
    n = int(n)
    return {"loss": loss / max(n, 1), "top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "n": n}


def resolve(path: str) -> str:
    """A checkpoint file (verified), or a checkpoints folder or its `latest` -> the checkpoint a resume
    would take: the newest whole one (a damaged one is named in a warning and skipped, not moved)."""
    if os.path.isdir(path) or os.path.basename(path) == checkpoint.POINTER:
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        found = checkpoint.Checkpointer(folder, is_main=False).find_resume("auto", set_aside=False)
        if found is None:
            raise FileNotFoundError(f"no whole checkpoint in {folder}")
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file {path}")
    checkpoint.verify(path)
    return path


def main(argv=None) -> dict:
    from imnet import data as data_mod
    from imnet import models

    p = argparse.ArgumentParser(prog="python -m imnet.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint file, checkpoints folder or its `latest`")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = p.parse_args(argv)
    try:
        path = resolve(a.checkpoint)
        state = checkpoint.load(path)
        cfg = config.load(None, a.overrides, base=state["config"])
    except (FileNotFoundError, RuntimeError, config.ConfigError) as e:
        p.error(str(e))
    d = dist.setup(cfg.dist)
    try:
        try:
            data = data_mod.build(cfg.data, d, seed=cfg.run.seed, channels_last=cfg.model.channels_last, train=False)
        except (FileNotFoundError, DataError) as e:  # missing or damaged data: one line naming the file
            dist.report_error(f"imnet.evaluate: error: {e}")
            sys.exit(1)
        model = models.from_config(cfg.model, data.info)
        model.load_state_dict(state["model"])
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        model.to(d.device, memory_format=fmt)
        result = evaluate(model, data.val, d.device, cfg.precision.amp)
        if result["n"] != data.n_val:
            raise RuntimeError(f"evaluated {result['n']} images, the val split has {data.n_val}")
        result.update(step=state["step"], checkpoint=path)
        if d.is_main:
            print(json.dumps(result), flush=True)
    finally:
        dist.cleanup()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
