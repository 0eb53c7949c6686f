"""The step that never waits for the device between log steps (issue 18): the same run as the synchronous
reference engine on two gloo ranks with a non-finite loss on one; a signal to one rank; no host reads
of the device between log steps; the device-side Meter; run.cuda_graph's fallback and its static-buffer
plumbing (checked on the CPU by replaying the captured step eagerly)."""

import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    cfg_for,
    child_env,
    final_checkpoint,
    fit,
    isolated,
    metrics,
    run,
    torchrun,
    train_steps,
)

from imnet import config, dist, engine, models
from imnet.engine.graph import GraphStep, reason_not
from imnet.engine.step import StepOut

TIMING = {"img_per_s", "data_wait", "peak_mem_gb", "time"}


def records(run_dir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(run_dir)]


def same_records(a: list[dict], b: list[dict]) -> bool:
    """Equal, with NaN equal to NaN (a skipped window's loss)."""
    def norm(rs):
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rs]
    return norm(a) == norm(b)


@pytest.mark.parametrize("every", [1, 3])
def test_two_ranks_with_a_nan_on_one_match_the_synchronous_engine(tmp_path, small_run, every):
    common = ["run.max_steps=10", "ckpt.every_steps=4", "ckpt.keep=10", f"log.every_steps={every}",
              "run.deterministic=true"]
    env = child_env(IMNET_FAULT="nan@step=3-4,rank=1")
    run(torchrun(2, "imnet.train", *small_run("new", *common)), env=env)
    script = os.path.join(ROOT, "tests", "sync_train.py")
    ref = isolated([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", "29511", script, *small_run("sync", *common)])
    run(ref, env={**env, "PYTHONPATH": ROOT})  # a script: its folder, not the checkout, heads sys.path
    new, sync = tmp_path / "new", tmp_path / "sync"
    a, b = final_checkpoint(new), final_checkpoint(sync)
    assert a["step"] == b["step"] == 10
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    assert same_records(records(new), records(sync))
    rows = [r for r in metrics(new) if r["split"] == "train"]
    if every == 1:
        assert [r["step"] for r in rows if r["skipped"]] == [3, 4]
        assert all(math.isnan(r["loss"]) for r in rows if r["skipped"])
    else:  # windows 1-3, 4-6, 7-9: one skipped step in each of the first two, loss over the updated steps
        assert [(r["step"], r["skipped"]) for r in rows] == [(3, 1), (6, 1), (9, 0)]
        assert all(math.isfinite(r["loss"]) for r in rows)
    ckpts = sorted(os.listdir(new / "checkpoints"))
    assert "ckpt_00000004.pt" not in ckpts and "ckpt_00000005.pt" in ckpts  # 4 is inside the streak: put off


def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, small_run):
    # SIGTERM reaches rank 1 as step 5 starts: step 5's all-reduce carries it, the loop reads it one step
    # late, so both ranks stop after step 6 and write its checkpoint, then exit 75
    p = run(torchrun(2, "imnet.train", *small_run("sig", "run.epochs=5", "log.every_steps=1")),
            env=child_env(IMNET_FAULT="signal@step=5,rank=1"), check=False)
    assert p.returncode == 1, p.stderr[-3000:]  # torchrun: a worker exited non-zero (75)
    assert "exitcode  : 75" in p.stderr
    assert "stopped by signal at step 6; checkpoint saved" in p.stdout
    assert sorted(os.listdir(tmp_path / "sig" / "checkpoints")) == ["ckpt_00000006.pt", "ckpt_00000006.pt.sha256",
                                                                    "latest"]
    assert train_steps(tmp_path / "sig") == [1, 2, 3, 4, 5, 6]


def test_no_host_reads_of_the_device_between_log_steps(tmp_path, monkeypatch):
    """Every call that copies a tensor's value to the host (on a GPU: waits for the device) is counted,
    with the step the loop was at; the loader's own host-side tensors (its sampler's permutation) are
    not the device's and are left out. The stop flag is read as numpy from a non-blocking copy."""
    seen = {"step": 0, "in_step": False}
    calls: list[tuple] = []
    real_add, real_step = engine.Meter.add, engine.DDPEngine.train_step

    def add(self, out):
        real_add(self, out)
        seen["step"] = self.step

    def train_step(self, *a, **k):
        seen["in_step"] = True
        try:
            return real_step(self, *a, **k)
        finally:
            seen["in_step"] = False

    monkeypatch.setattr(engine.Meter, "add", add)
    monkeypatch.setattr(engine.DDPEngine, "train_step", train_step)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith(("imnet.data", "torch.utils.data")):
                calls.append((seen["step"], seen["in_step"], _name, caller))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    fit(cfg_for(tmp_path, "quiet", "data.synthetic_size=256", "log.every_steps=4", "run.max_steps=12",
                "ckpt.every_steps=0"))
    assert [c for c in calls if c[1]] == []  # inside the step: none, ever
    between = [c for c in calls if 1 <= c[0] < 12 and c[0] % 4]
    assert between == []
    reads = {c[0] for c in calls if c[2] == "tolist" and c[3] == "imnet.engine.meter"}
    assert reads == {4, 8, 12}  # one read of the Meter per log step
    rows = [r for r in metrics(tmp_path / "quiet") if r["split"] == "train"]
    assert [(r["step"], r["skipped"]) for r in rows] == [(4, 0), (8, 0), (12, 0)]


def test_meter_sums_streak_and_stop_one_step_late():
    m = engine.Meter(torch.device("cpu"), max_nonfinite=2, step=10)
    steps = [[0, 0, 2.0, 3, 4], [1, 0, 0, 1, 4], [0, 1, 4.0, 2, 4], [1, 0, 0, 0, 4], [2, 0, 0, 0, 4]]
    stops = []
    for s in steps:
        m.add(StepOut(torch.tensor(s, dtype=torch.float32)))
        stops.append(m.stop_before())
    assert stops == [False, False, False, True, False]  # step 13's request, seen after step 14
    assert m.streak() == (2, 15)  # 14 and 15 skipped: the limit (2) reached at step 15
    assert m.read() == {"loss": 6.0 / 8, "top1": 5 / 8, "images": 20, "skipped": 3, "streak": 2, "hit": 15}
    m.add(StepOut(torch.tensor([0, 0, 1.0, 4, 4])))
    r = m.read()
    assert (r["loss"], r["top1"], r["images"], r["skipped"], r["streak"]) == (0.25, 1.0, 4, 0, 0)
    m.add(StepOut(torch.tensor([1.0, 0, 0, 0, 4])))
    r = m.read()
    assert math.isnan(r["loss"]) and math.isnan(r["top1"]) and r["skipped"] == 1 and r["images"] == 4


def _engine(*overrides):
    cfg = config.load(None, ["model.gn_groups=8", *overrides])
    torch.manual_seed(0)
    model = models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn", norm_kwargs={"groups": 8})
    return engine.DDPEngine(cfg, model, dist.setup(cfg.dist))


def _batches(n: int, size: int = 4):
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]
    if n > 4:
        out[4][0][0, 0, 0, 0] = float("nan")  # step 5: skipped
    return out


def test_a_skipped_first_step_leaves_the_momentum_at_zero():
    """Fused SGD makes its momentum buffers uninitialized on a first step; skipped, they would stay so."""
    a, b = _engine(), _engine()
    x, y = _batches(5)[4]
    a.train_step([(x, y)], lr=0.1)  # non-finite: skipped
    assert all(torch.equal(v["momentum_buffer"], torch.zeros_like(v["momentum_buffer"]))
               for v in a.optimizer.state.values())
    batch = _batches(1)[0]
    a.train_step([batch], lr=0.1)
    b.train_step([batch], lr=0.1)
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_graph_step_replays_what_the_eager_step_does(optim):
    eager, graphed = _engine("optim.grad_clip=1.0", f"optim.name={optim}"), _engine("optim.grad_clip=1.0",
                                                                                     f"optim.name={optim}")
    said: list[str] = []
    step = GraphStep(graphed, capture=lambda fn: fn, log=said.append)  # replay = run the traced step again
    for i, (x, y) in enumerate(_batches(8)):
        a = eager.train_step([(x, y)], 0.1 * (i + 1), stop_requested=i == 5)
        b = step([(x, y)], 0.1 * (i + 1), stop_requested=i == 5)
        assert torch.equal(a.stats, b.stats), i
    assert b.stats is step.traced["out"].stats
    odd = (torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,)))
    assert torch.equal(eager.train_step([odd], 0.5).stats, step([odd], 0.5).stats)
    x, y = _batches(1)[0]
    assert torch.equal(eager.train_step([(x, y)], 0.25).stats, step([(x, y)], 0.25).stats)  # replayed again
    for (k, v), w in zip(eager.module.state_dict().items(), graphed.module.state_dict().values()):
        assert torch.equal(v, w), k
    assert isinstance(step.lr, torch.Tensor)  # the graph's lr input; a checkpoint holds it as a number
    assert [g["lr"] for g in graphed.state_dict()["optimizer"]["param_groups"]] == [0.25, 0.25]
    assert said == ["run.cuda_graph: step 4 on is one captured CUDA graph (4x3x16x16)",
                    "run.cuda_graph: step 9 has batches of another shape than the captured graph's (2x3x16x16, "
                    "not 4x3x16x16): such steps run eager"]


def test_cuda_graph_says_why_it_runs_eager(tmp_path, capsys):
    fit(cfg_for(tmp_path, "g", "run.cuda_graph=true", "run.max_steps=2"))
    assert "run.cuda_graph: needs a CUDA device (this run is on cpu): the step runs eager" in capsys.readouterr().out
    gpu = SimpleNamespace(device=torch.device("cuda", 0), world=1)
    cases = {"dist.backend=deepspeed": "not with dist.backend=deepspeed (DeepSpeed steps its own optimizer)",
             "precision.amp=fp16": "not with precision.amp=fp16 (GradScaler); bf16 and off capture",
             "model.compile=true": "not with model.compile (choose one)"}
    for override, why in cases.items():
        assert reason_not(config.load(None, ["run.cuda_graph=true", override]), gpu) == why
    on = config.load(None, ["run.cuda_graph=true"])
    assert reason_not(on, gpu) is None
    assert reason_not(on, SimpleNamespace(device=gpu.device, world=2)) == (
        "not yet with more than one process (this run has 2)")
    assert reason_not(config.load(None, []), SimpleNamespace(device=torch.device("cpu"), world=1)) is None


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(tmp_path, monkeypatch):
    real = engine.DDPEngine.update
    updates = []

    def update(self, skip):
        real(self, skip)
        updates.append(1)
        if len(updates) == 4:  # step 4's loss was finite, its update (say an overflow) was not
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(engine.DDPEngine, "update", update)
    with pytest.raises(FloatingPointError) as e:
        fit(cfg_for(tmp_path, "inf", "data.synthetic_size=256", "ckpt.every_steps=2", "run.max_steps=8"))
    ck = tmp_path / "inf" / "checkpoints"
    assert str(e.value) == ("non-finite weights at step 4 after finite losses (an overflow in the backward?): no "
                            "checkpoint written; lower optim.base_lr or set optim.grad_clip; "
                            f"{ck}/ckpt_00000002.pt is the newest checkpoint")
    assert sorted(os.listdir(ck)) == ["ckpt_00000002.pt", "ckpt_00000002.pt.sha256", "latest"]
