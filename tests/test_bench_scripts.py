"""The benchmark scripts start, and the one-call GPU session runs every step as far as a CPU allows.

GPU time is scarce (a few minutes, in some tasks only): a renamed option in a bench script must
fail here, not on the GPU machine. Without a GPU each GPU step parses its arguments and stops with
"needs a CUDA GPU" (exit 2); an unknown option would stop with argparse's "unrecognized arguments".
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py") and f != "benchmarks_md.py")
STEPS = ("env", "step_gpu_check", "train_throughput", "microbatch_step", "precompile", "precompile_256", "gn_gpu_check",
         "loader_gpu_check", "rn50_throughput",
         "precompile_local", "gn_gpu_check_local", "norm_kernels_graph", "rn50_local", "rn50_cuda_graph",
         "norm_kernels_graph_residual", "gn_tune", "norm_kernels_compile")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def _ended(log: str) -> list[str]:
    """The steps of a gpu_session.sh log that ran to an exit status, in order."""
    return re.findall(r"^== (\w+): exit ", log, re.M)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the session really runs (minutes)")
def test_gpu_session_runs_every_step_without_a_gpu(tmp_path):
    before = open(os.path.join(ROOT, "BENCHMARKS.md")).read()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "300"],
                       env={**env, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "session.log").read_text()
    assert r.returncode == 2, r.stdout + r.stderr  # the correctness check's status: no GPU
    for step in STEPS:
        assert f"== {step}: exit " in log, (step, log)
    assert "unrecognized arguments" not in log and "invalid choice" not in log, log
    # step_gpu_check, train_throughput, microbatch_step, 3 x gn_gpu_check (the local one for 2 plans), loader_gpu_check,
    # gn_tune, 3 x rn50_throughput, 3 x norm_kernels: all parse their options
    assert log.count("needs a CUDA GPU") == 14
    assert log.count("give the target's --arch and --sms") == 4  # precompile without a GPU (local: 2 plans)
    assert _ended(log) == list(STEPS)
    assert sorted(os.listdir(tmp_path)) == ["BENCHMARKS.md", "session.log"]
    assert (tmp_path / "BENCHMARKS.md").read_text() == before  # nothing measured, nothing written


def test_gpu_session_runs_only_the_named_steps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "300"],
                       env={**env, "OUT": str(tmp_path), "STEPS": "env gn_gpu_check"},
                       capture_output=True, text=True, timeout=600)
    log = (tmp_path / "session.log").read_text()
    assert r.returncode == 2 and _ended(log) == ["env", "gn_gpu_check"], log


def test_gn_tune_rounds_budget_and_failures(capsys):
    """bench/gn_tune.py's choice, with a stand-in for the GPU timing: round 1 runs the defaults first
    and each configuration once, round 2 the merge of those that beat the defaults; a configuration
    that raises is left out, and none starts once the budget is spent."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gn_tune
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    ratio = {"": 1.0, "programs_per_sm=2": 0.9, "tile=8192,warps=8": 0.95, "block_c=64": 1.2,
             "tile=8192,programs_per_sm=2,warps=8": 0.8}
    calls = []

    def measure(cfg):
        calls.append(cfg)
        if cfg == "tile=2048":
            raise RuntimeError("out of resources")
        return {32: {"bn": 1.0, "imnet": ratio[cfg]}, 256: {"bn": 2.0, "imnet": 2 * ratio[cfg]}}

    configs = ["programs_per_sm=2", "block_c=64", "tile=2048", "tile=8192,warps=8", "programs_per_sm=2"]
    results = gn_tune.tune(configs, measure, lambda: 1.0)
    merged = "tile=8192,programs_per_sm=2,warps=8"  # in Tuning's field order
    assert gn_tune.merge(["programs_per_sm=2", "tile=8192,warps=8"]) == merged
    assert calls == ["", "programs_per_sm=2", "block_c=64", "tile=2048", "tile=8192,warps=8", merged]
    assert list(results) == ["", "programs_per_sm=2", "block_c=64", "tile=8192,warps=8", merged]
    assert gn_tune.score(results[merged]) == pytest.approx(1.6)
    assert "tile=2048: failed, left out: RuntimeError: out of resources" in capsys.readouterr().out

    calls.clear()
    left = iter([1.0, 1.0, 0.0, 0.0, 0.0])
    results = gn_tune.tune(configs, measure, lambda: next(left))
    assert calls == ["", "programs_per_sm=2"] and "not run, the time budget is spent" in capsys.readouterr().out
    # only one configuration beat the defaults: no merge
    assert gn_tune.merge(["block_c=64", "block_c=32"]) == "block_c=64"  # a conflict: the first one wins


def test_norm_kernels_captures_each_tuned_variant_under_its_own_plan(monkeypatch):
    """--tune: each extra imnet variant's steps are captured (CUDA graph) under its launch plan, the
    others under the plan in use, which is back in place afterwards."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import norm_kernels
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    from imnet.kernels.gn import plan

    captured = {}

    def graphed(step, iters):
        captured[step] = str(plan.tuning())
        return step

    monkeypatch.setattr(norm_kernels, "graphed", graphed)
    monkeypatch.setattr(norm_kernels, "time_steps", lambda graphs, iters, repeats, warmup: {m: 1.0 for m in graphs})
    steps = {"bn": "bn step", "imnet": "imnet step", "imnet[local=16]": "local step"}
    t = norm_kernels.time_methods(steps, 4, 1, True, {"imnet[local=16]": "local=16"})
    assert captured == {"bn step": "", "imnet step": "", "local step": "local=16"}
    assert t == {m: 0.25 for m in steps} and plan.tuning() == plan.Tuning()


def test_train_throughput_runs_its_trainer_path_on_the_cpu():
    """--smoke: the same imnet.train runs (resident synthetic data, eager and run.cuda_graph) with a small
    net on the CPU, where the graph falls back and says so; the rows come out."""
    from conftest import isolated

    r = subprocess.run(isolated([sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"), "--smoke",
                                 "--batches", "2", "--norms", "gn", "--windows", "2"]),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| smoke (CPU) | 2 | gn |")]
    assert [row.split(" | ")[3] for row in rows] == ["eager", "graph"], r.stdout
    assert "gn_graph_2: run.cuda_graph: needs a CUDA device (this run is on cpu): the step runs eager" in r.stdout
