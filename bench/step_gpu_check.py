"""On a GPU: the default step never makes the host wait for the device, and run.cuda_graph's replayed step
trains as the eager one does.

    python bench/step_gpu_check.py [--steps 12]

1. `torch.cuda.set_sync_debug_mode("error")` around each step of DDPEngine.train_step + Meter.add
   (what imnet.train does between log steps, the one-step-late stop read aside): a synchronizing CUDA
   call raises. Also with grad clipping and bf16.
2. GraphStep (a real torch.cuda.graph capture) against the eager engine, from the same weights on the
   same batches, the learning rate changing every step and a NaN batch at step 6, for resnet20 with
   GN and with BN: every step's all-reduced figures (the NaN step skipped on both) and the final
   weights agree to float32 rounding (cuDNN's deterministic algorithms on).

Prints one line per check; exit 1 on a failure, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch


def engine_for(norm: str, *extra: str):
    from imnet import config, dist, engine, models

    cfg = config.load(None, ["dist.device=cuda", "precision.amp=bf16", "model.channels_last=true",
                             "model.gn_groups=8", *extra])
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=10, image_size=32, norm=norm,
                         norm_kwargs={"groups": 8} if norm == "gn" else {})
    d = dist.setup(cfg.dist)
    return engine.DDPEngine(cfg, model, d), engine.Meter(d.device, 10**6)


def batches(n: int, size: int = 8) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        x = torch.randn(size, 3, 32, 32, generator=g)
        if i == 5:
            x[0, 0, 0, 0] = float("nan")
        out.append((x.cuda().contiguous(memory_format=torch.channels_last),
                    torch.randint(0, 10, (size,), generator=g).cuda()))
    return out


def no_sync(steps: int) -> str | None:
    for extra in ([], ["optim.grad_clip=1.0"]):
        eng, meter = engine_for("gn", *extra)
        data = batches(steps)
        for i, b in enumerate(data):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = eng.train_step([b], 0.01 * (i + 1))
                meter.add(out)
            except RuntimeError as e:
                return f"step {i + 1} ({' '.join(extra) or 'defaults'}) synchronized: {e}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            meter.stop_before()
        r = meter.read()
        if r["skipped"] != 1 or r["images"] != 8 * steps:
            return f"the Meter read {r} (1 skipped step, {8 * steps} images expected)"
    return None


def graph_matches(norm: str, steps: int) -> str | None:
    from imnet.engine import GraphStep

    (eager, _), (graphed, _) = engine_for(norm), engine_for(norm)
    step = GraphStep(graphed, log=lambda s: None)
    for i, b in enumerate(batches(steps)):
        a = eager.train_step([b], 0.01 * (i + 1)).stats.clone()
        g = step([b], 0.01 * (i + 1)).stats.clone()
        if bool(a[0] > 0) != bool(g[0] > 0) or not torch.allclose(a, g, rtol=1e-4, atol=1e-4):
            return f"{norm}: step {i + 1}: eager {a.tolist()} vs graph {g.tolist()}"
    if step.replay is None:
        return f"{norm}: no graph was captured"
    worst = max((p - q).abs().max().item() for p, q in zip(eager.module.parameters(), graphed.module.parameters()))
    if worst > 1e-3:
        return f"{norm}: weights differ by up to {worst:.3g} after {steps} steps"
    print(f"graph {norm}: {steps} steps, the figures agree, weights within {worst:.2g}", flush=True)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("step_gpu_check.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    failures = []
    why = no_sync(args.steps)
    print(f"no host sync per step: {'FAILED: ' + why if why else 'ok'}", flush=True)
    failures += [why] if why else []
    for norm in ("gn", "bn"):
        try:
            why = graph_matches(norm, args.steps)
        except Exception as e:  # a capture that fails is a failed check, with its reason
            why = f"{norm}: {type(e).__name__}: {e}"
        if why:
            print(f"graph {norm}: FAILED: {why}", flush=True)
            failures.append(why)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
