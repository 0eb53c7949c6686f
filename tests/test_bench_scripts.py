"""The benchmark scripts start, and the one-call GPU session runs every step as far as a CPU allows.

GPU time is scarce (a few minutes, in some tasks only): a renamed option in a bench script must
fail here, not on the GPU machine. Without a GPU each GPU step parses its arguments and stops with
"needs a CUDA GPU" (exit 2); an unknown option would stop with argparse's "unrecognized arguments".
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py") and f != "benchmarks_md.py")
STEPS = ("env", "precompile", "gn_gpu_check", "rn50_throughput", "norm_kernels", "norm_kernels_residual",
         "rn50_cuda_graph", "norm_kernels_compile")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the session really runs (minutes)")
def test_gpu_session_runs_every_step_without_a_gpu(tmp_path):
    before = open(os.path.join(ROOT, "BENCHMARKS.md")).read()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_session.sh"), "300"], env={**env, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=600)
    log = (tmp_path / "session.log").read_text()
    assert r.returncode == 2, r.stdout + r.stderr  # the correctness check's status: no GPU
    for step in STEPS:
        assert f"== {step}: exit " in log, (step, log)
    assert "unrecognized arguments" not in log and "invalid choice" not in log, log
    assert log.count("needs a CUDA GPU") == 6  # gn_gpu_check, 2 x rn50_throughput, 3 x norm_kernels: all parse
    assert "give the target's --arch and --sms" in log  # precompile without a GPU
    assert sorted(os.listdir(tmp_path)) == ["BENCHMARKS.md", "session.log"]
    assert (tmp_path / "BENCHMARKS.md").read_text() == before  # nothing measured, nothing written
