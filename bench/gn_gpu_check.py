"""GPU self-check of imnet's channels-last Triton GroupNorm: the CPU tests' comparisons, on CUDA.

    python bench/gn_gpu_check.py [--batches 2 32] [--dtypes bf16 fp16 fp32] [--seed 0]

For every distinct ResNet-50 norm shape (C, H, W at 224x224), each batch size, each dtype and each
epilogue (plain, fused ReLU, fused residual-add + ReLU): fresh random inputs (x = 3*randn + 5,
random gamma, beta, dy, residual; never zeros), the kernels' forward and all gradients (input,
gamma, beta, residual) against torch.nn.functional.group_norm (+ add, ReLU) in float64 on the GPU.
Also the spatial split forced to 7-row chunks at batch 2, and ChannelsLastGroupNorm under bf16
autocast, torch.compile's path (the custom ops) against eager, and (with 2 GPUs) the module on a
GPU that is not the current device. Each case runs twice, on
different data: the first call compiles and records the kernels, the checked second one starts the
recorded kernels directly, the path of every later training step. Prints one table row per case
and exits 1 on any mismatch (2 without a GPU). The launch plan is IMNET_GN_TUNE's (e.g. local=16:
the chunks column says "local" where the local kernels ran).

ReLU ties: with ReLU, dy is set to 0 where the float64 pre-activation is within 1e-5 * its max of
0 (reference.relu_ties): there float32 rounding decides relu'(v), and at 32 images a few such
elements per layer flip either way. The table gives their count and, for information, the dx error
with dy kept there.

Error = max |kernel - float64| / max |float64| per tensor. Bounds (the CPU tests' bounds, looser for
float32 and the parameter gradients, which sum up to 32*112*112 = 401k products here instead of <= 128):
outputs (y, dx, d residual) float32 1e-4, float16 2e-3, bfloat16 1e-2 (a GPU rounds to nearest:
2^-8 = 3.9e-3); dgamma, dbeta (float32) 1e-4 for every input dtype.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from imnet.dtypes import DTYPES
from imnet.kernels.common import Act, interpreting

OUT_BOUND = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PARAM_BOUND = 1e-4
EPILOGUES = {"plain": (Act.NONE, False), "relu": (Act.RELU, False), "residual": (Act.RELU, True)}


def check(n, c, h, w, dtype, epilogue, gen, rows_per_chunk=None, groups=32) -> dict:
    from imnet.kernels import reference
    from imnet.kernels.gn import ops, plan

    act, residual = EPILOGUES[epilogue]
    cl = torch.channels_last
    # A first call on other data goes through Triton's JIT, which compiles (or loads) the kernels, and
    # records them; the checked call below starts them directly, as every training step after the
    # first does (imnet.kernels.gn.launch.Replay). Its fresh inputs would show a launch with stale arguments.
    first = [t.requires_grad_() for t in reference.random_inputs(n, c, h, w, dtype, gen, residual) if t is not None]
    first_dy = first.pop(3)
    y = ops.group_norm(first[0], groups, first[1], first[2], 1e-5, act=act,
                       residual=first[3] if residual else None, rows_per_chunk=rows_per_chunk)
    torch.autograd.grad(y, first, first_dy.detach())
    x, weight, bias, dy, r = reference.random_inputs(n, c, h, w, dtype, gen, residual)
    ties = 0
    raw_dx = None
    if act == Act.RELU:  # dy = 0 where float32 rounding decides relu'(v) (reference.relu_ties)
        tie = reference.relu_ties(x, weight, bias, groups, 1e-5, r)
        ties = int(tie.sum())
        raw_dy, dy = dy, dy.masked_fill(tie, 0)
    ins = [t.requires_grad_() for t in (x, weight, bias, r) if t is not None]
    y = ops.group_norm(ins[0], groups, ins[1], ins[2], 1e-5, act=act, residual=ins[3] if residual else None,
                       rows_per_chunk=rows_per_chunk)
    if ties:  # what the untouched dy gives, for the table only
        raw_grads = torch.autograd.grad(y, ins, raw_dy, retain_graph=True)
        raw_dx = reference.errors_vs_float64(y, raw_grads, ins, raw_dy, groups, 1e-5, act)["dx"]
    grads = torch.autograd.grad(y, ins, dy)
    errs = reference.errors_vs_float64(y, grads, ins, dy, groups, 1e-5, act)
    problems = []
    if not (y.dtype == dtype and y.is_contiguous(memory_format=cl)):
        problems.append(f"output {y.dtype}, channels_last={y.is_contiguous(memory_format=cl)}")
    if not all(torch.isfinite(t).all() for t in (y, *grads)):
        problems.append("non-finite values")
    for name, e in errs.items():
        bound = PARAM_BOUND if name in ("dgamma", "dbeta") else OUT_BOUND[dtype]
        if not e <= bound:
            problems.append(f"{name} {e:.1e} > {bound:.0e}")
    p = plan.plan(n, c, h * w, groups, ops.sm_count(x.device), rows_per_chunk)
    return {"errs": errs, "problems": problems, "chunks": "local" if p.local else p.chunks, "ties": ties,
            "raw_dx": raw_dx}


def check_module_under_autocast(gen, dev="cuda") -> list[str]:
    from imnet.kernels import ChannelsLastGroupNorm, reference

    m = ChannelsLastGroupNorm(32, 256, act=Act.RELU, any_gpu=True).to(dev)
    x = (3 * torch.randn(2, 256, 14, 14, device=dev, generator=gen) + 5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev, dtype=torch.bfloat16):
        y = m(x)
    ref = torch.relu(F.group_norm(x.double(), 32, m.weight.double(), m.bias.double(), 1e-5))
    problems = []
    if y.dtype != torch.bfloat16 or type(y.grad_fn).__name__ != "GroupNormNHWCBackward":
        problems.append(f"autocast: {y.dtype}, {type(y.grad_fn).__name__} (expected bf16 from the kernels)")
    err = reference.relative_error(y, ref)
    if err > OUT_BOUND[torch.bfloat16]:
        problems.append(f"autocast: y error {err:.1e}")
    return problems


def check_compiled(gen, dev="cuda") -> list[str]:
    """torch.compile (aot_eager backend: autograd traced, ops run as they are) of relu(GN(x) + r) and
    GN + ReLU modules in bf16: one graph, no break, and the output and every gradient equal to eager's
    (the custom ops imnet::group_norm_fwd/_bwd launch the same kernels)."""
    from imnet.kernels import ChannelsLastGroupNorm

    torch.manual_seed(1)
    gn1 = ChannelsLastGroupNorm(32, 256, act=Act.RELU, any_gpu=True).to(dev)
    gn2 = ChannelsLastGroupNorm(32, 256, act=Act.RELU, any_gpu=True).to(dev)

    def f(x, r):
        return gn2(gn1(x), r)

    x = (3 * torch.randn(8, 256, 14, 14, device=dev, generator=gen) + 5).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, device=dev, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, device=dev, generator=gen).to(torch.bfloat16)
    params = [*gn1.parameters(), *gn2.parameters()]

    def run(fn):
        xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
        y = fn(xs, rs)
        return [y.detach(), *torch.autograd.grad(y, [xs, rs, *params], dy)]

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, r)
    problems = []
    if explained.graph_break_count:
        problems.append(f"compile: {explained.graph_break_count} graph breaks: {explained.break_reasons}")
    eager = run(f)
    compiled = run(torch.compile(f, backend="aot_eager"))
    names = ["y", "dx", "dresidual", "dgamma1", "dbeta1", "dgamma2", "dbeta2"]
    for name, a, b in zip(names, compiled, eager):
        if not torch.equal(a, b):
            problems.append(f"compile: {name} differs from eager by {(a.float() - b.float()).abs().max().item():.1e}")
    return problems


def check_other_gpu(gen, dev="cuda") -> list[str]:
    """ChannelsLastGroupNorm on the last GPU while the first is the current device (Triton launches on
    the current one unless imnet switches): y and every gradient against float64. Needs 2 GPUs."""
    from imnet.kernels import ChannelsLastGroupNorm, reference

    other = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    x, weight, bias, dy, _ = (None if t is None else t.to(other)
                              for t in reference.random_inputs(2, 256, 14, 14, torch.float32, gen))
    m = ChannelsLastGroupNorm(32, 256, any_gpu=True).to(other)   # no ReLU: no ties to mask
    with torch.no_grad():
        m.weight.copy_(weight)
        m.bias.copy_(bias)
    ins = [x.requires_grad_(), m.weight, m.bias]
    y = m(x)
    errs = reference.errors_vs_float64(y, torch.autograd.grad(y, ins, dy), ins, dy, 32, 1e-5, None)
    problems = []
    if type(y.grad_fn).__name__ != "GroupNormNHWCBackward":
        problems.append(f"{other}: {type(y.grad_fn).__name__} ran, not the kernels")
    for name, e in errs.items():
        bound = PARAM_BOUND if name in ("dgamma", "dbeta") else OUT_BOUND[torch.float32]
        if not e <= bound:
            problems.append(f"{other}: {name} {e:.1e} > {bound:.0e}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: under TRITON_INTERPRET=1, only to try this script without a GPU (slow)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gn_gpu_check: needs a CUDA GPU (the CPU tests are tests/test_gn_kernels.py)", file=sys.stderr)
        return 2
    if args.device == "cpu" and not interpreting():
        p.error("--device cpu needs TRITON_INTERPRET=1")
    import triton

    from imnet import arch

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton interpreter)"
    from imnet.kernels.gn.plan import tuning

    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}, IMNET_GN_TUNE={tuning()}")
    print("| N | C | HxW | dtype | epilogue | chunks | y | dx | dgamma | dbeta | dres | ReLU ties "
          "| dx, dy kept at ties | result |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    cases = [(n, c, h, w, dt, ep, None) for n in args.batches for (c, h, w) in arch.norm_shapes("resnet50")
             for dt in args.dtypes for ep in EPILOGUES]
    cases += [(2, c, h, w, dt, "residual", 7) for (c, h, w) in ((64, 56, 56), (2048, 7, 7)) for dt in args.dtypes]
    for n, c, h, w, dt, ep, rows in cases:
        r = check(n, c, h, w, DTYPES[dt], ep, gen, rows)
        e = r["errs"]
        cols = " | ".join(f"{e[k]:.1e}" if k in e else "-" for k in ("y", "dx", "dgamma", "dbeta", "dresidual"))
        ok = not r["problems"]
        failures += not ok
        raw = "-" if r["raw_dx"] is None else f"{r['raw_dx']:.1e}"
        print(f"| {n} | {c} | {h}x{w} | {dt} | {ep}{'' if rows is None else f' (rows {rows})'} | {r['chunks']} | "
              f"{cols} | {r['ties']} | {raw} | {'ok' if ok else 'FAIL: ' + '; '.join(r['problems'])} |", flush=True)
    failed = 0
    extra = [("module under autocast", check_module_under_autocast), ("torch.compile", check_compiled)]
    if args.device == "cuda" and torch.cuda.device_count() > 1:
        extra.append(("on another GPU than the current one", check_other_gpu))
    else:
        print("on another GPU than the current one: not checked (one GPU)")
    for name, fn in extra:
        problems = fn(gen, args.device)
        print(f"{name}: " + ("ok" if not problems else "FAIL: " + "; ".join(problems)), flush=True)
        failed += bool(problems)
    failures += failed
    print(f"{len(cases) + len(extra) - failures} / {len(cases) + len(extra)} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
