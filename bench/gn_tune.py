"""Time the launch-plan knobs of imnet's GroupNorm kernels (group_norm.Tuning) on a GPU; pick the fastest.

    python bench/gn_tune.py [--batches 32 256] [--configs "" programs_per_sm=4 ...] [--budget 150]
                            [--iters 20] [--repeats 3] [--jobs 16] [--env-out FILE] [--write]

For each configuration (an IMNET_GN_TUNE string; "" is the defaults): compile its launches (bf16,
norm + ReLU, every distinct ResNet-50 norm shape at the given batches) in parallel processes with
imnet.kernels.precompile, then time forward + backward of norm + ReLU on each shape exactly as
bench/norm_kernels.py --epilogue relu --cuda-graph does (`--iters` steps as one CUDA graph: the GPU's
time, not the host's), with BN + ReLU timed alongside in the same repeats.
Each time is weighted by how many layers of ResNet-50 have that shape: the norm time per ResNet-50
step, imnet's and BN's, and their ratio. The score of a configuration is its ratio summed over the
batches (lower is better).

Round 1 runs the given configurations (by default the defaults, then one knob at a time); round 2
merges the knob settings of every round-1 configuration that beat the defaults, if that makes a new
configuration. Configurations stop starting once --budget seconds are spent. Prints a markdown
table; --env-out writes `IMNET_GN_TUNE=<winner>` (empty for the defaults) for a shell to source;
--write appends the table's rows to BENCHMARKS.md below `<!-- gn_tune rows -->`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from benchmarks_md import append_rows, gpu_head

MARKER = "<!-- gn_tune rows -->"
# The local kernels first (not yet timed; tile=16384: whole 28x28 samples in registers, one 16-warp
# program per SM); then the knobs timed against programs_per_sm=2 before.
ROUND1 = ("", "local=16", "local=16,tile=16384", "local=32", "local=64",
          "programs_per_sm=2", "programs_per_sm=8", "align_rows=1", "tile=8192,warps=8", "warps=8", "tile=2048",
          "block_c=64")


def merge(configs: list[str]) -> str:
    """One IMNET_GN_TUNE string with the knob settings of all `configs` (the first one wins a conflict)."""
    from imnet.kernels.gn.plan import Tuning, parse_tuning

    knobs: dict = {}
    for cfg in configs:
        t = parse_tuning(cfg)
        for name, value in vars(t).items():
            if value != getattr(Tuning(), name):
                knobs.setdefault(name, value)
    return str(Tuning(**knobs))


def score(res: dict) -> float:
    """{batch: {"bn": s, "imnet": s}} -> the imnet/bn time ratio summed over the batches."""
    return sum(r["imnet"] / r["bn"] for r in res.values())


def tune(configs: list[str], measure, time_left) -> dict[str, dict]:
    """Round 1: measure(cfg) for each configuration (the defaults, "", first); round 2: the merge of
    the round-1 configurations that beat the defaults, if there are several and the merge is new.
    A configuration starts only while time_left() > 0; one whose measure raises is left out.
    Returns {cfg: measure(cfg)} in run order."""
    results: dict[str, dict] = {}

    def run(cfg: str) -> None:
        if time_left() <= 0:
            print(f"# {cfg or 'defaults'}: not run, the time budget is spent", flush=True)
            return
        try:
            results[cfg] = measure(cfg)
        except Exception as e:  # e.g. a configuration that needs more shared memory than the GPU has
            print(f"# {cfg or 'defaults'}: failed, left out: {type(e).__name__}: {e}", flush=True)

    for cfg in dict.fromkeys(["", *configs]):
        run(cfg)
    if "" in results:
        better = sorted((c for c in results if c and score(results[c]) < score(results[""])),
                        key=lambda c: score(results[c]))
        if len(better) > 1 and merge(better) not in results:
            run(merge(better))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--configs", nargs="+", default=list(ROUND1),
                   help='IMNET_GN_TUNE strings for round 1 ("" = the defaults, always run first)')
    p.add_argument("--budget", type=float, default=150, help="seconds after which no configuration starts")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--env-out", help="write IMNET_GN_TUNE=<winner> to this file")
    p.add_argument("--write", action="store_true", help=f"append the rows to BENCHMARKS.md below {MARKER}")
    args = p.parse_args()
    from imnet.kernels.gn import plan

    configs = [str(plan.parse_tuning(c)) for c in args.configs]  # a typo fails here, before any GPU work
    if not torch.cuda.is_available():
        print("gn_tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    from norm_kernels import make_step, time_methods

    from imnet.arch import norm_shapes
    from imnet.kernels import precompile
    from imnet.kernels.common import Act

    t0 = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    arch, sms = props.major * 10 + props.minor, props.multi_processor_count
    shapes = norm_shapes("resnet50")
    inputs = {}
    for n in args.batches:
        for (c, h, w) in shapes:
            gen = torch.Generator(device="cuda").manual_seed(c * h + n)
            cl = torch.channels_last
            x = (3 * torch.randn(n, c, h, w, device="cuda", generator=gen) + 5).to(torch.bfloat16)
            dy = torch.randn(n, c, h, w, device="cuda", generator=gen).to(torch.bfloat16)
            inputs[n, c, h, w] = (x.contiguous(memory_format=cl).requires_grad_(), dy.contiguous(memory_format=cl))
    head = gpu_head(with_tuning=False)  # each row names its own configuration
    base = plan.tuning()
    pool = precompile.make_pool(args.jobs)

    def measure(cfg: str) -> dict:
        plan.set_tuning(plan.parse_tuning(cfg))
        tc = time.perf_counter()
        launches = precompile.record(list(shapes), args.batches, [torch.bfloat16], sms, acts=(Act.RELU,))
        precompile.compile_all(launches, arch, args.jobs, pool=pool)
        compile_s = time.perf_counter() - tc
        res = {}
        for n in args.batches:
            total = {"bn": 0.0, "imnet": 0.0}
            for (c, h, w), count in shapes.items():
                x, dy = inputs[n, c, h, w]
                steps = {m: make_step(m, c, "relu", x, None, dy) for m in ("bn", "imnet")}
                t = time_methods(steps, args.iters, args.repeats, cuda_graph=True)
                for m in total:
                    total[m] += count * t[m]
                print(f"#   {cfg or 'defaults'} N={n} C={c} {h}x{w}: bn {t['bn'] * 1e3:.3f} ms, "
                      f"imnet {t['imnet'] * 1e3:.3f} ms", flush=True)
            res[n] = total
        ratios = " ".join(f"N={n} {res[n]['imnet'] / res[n]['bn']:.3f}" for n in args.batches)
        print(f"# {cfg or 'defaults'}: compiled {len(launches)} launches in {compile_s:.0f} s; imnet/bn {ratios}",
              flush=True)
        return res

    try:
        results = tune(configs, measure, lambda: args.budget - (time.perf_counter() - t0))
    finally:
        pool.close()
        plan.set_tuning(base)
    if not results:
        print("gn_tune: no configuration was measured", file=sys.stderr)
        return 1
    best = min(results, key=lambda c: score(results[c]))
    cols = " | ".join(f"N={n} imnet ms/step | N={n} bn ms/step | N={n} imnet/bn" for n in args.batches)
    print(f"| date | GPU | versions | IMNET_GN_TUNE | {cols} | score | chosen |")
    print("|---|---|---|---|" + "---|" * (3 * len(args.batches)) + "---|---|")
    rows = []
    for cfg, res in results.items():
        vals = " | ".join(f"{res[n]['imnet'] * 1e3:.2f} | {res[n]['bn'] * 1e3:.2f} "
                          f"| {res[n]['imnet'] / res[n]['bn']:.3f}" for n in args.batches)
        row = f"| {head} | {cfg or '(defaults)'} | {vals} | {score(res):.3f} | {'yes' if cfg == best else ''} |"
        print(row)
        rows.append(row)
    print(f"# winner: {best or 'the defaults'} after {time.perf_counter() - t0:.0f} s")
    if args.env_out:
        with open(args.env_out, "w") as f:
            f.write(f"IMNET_GN_TUNE={best}\n")
    if args.write:
        append_rows(MARKER, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
