"""The loop's single-process behaviour, in process: accumulation, clipping, AMP, non-finite steps."""

import math

import pytest
import torch
from conftest import cfg_for, final_checkpoint, fit, max_diff

from imnet import config, dist, engine, models, train
from imnet.log import read_metrics


def test_grad_accumulation_equals_the_big_batch(tmp_path):
    fit(cfg_for(tmp_path, "acc", "optim.accum_steps=2", "data.batch_size=4", "run.max_steps=3"))
    fit(cfg_for(tmp_path, "big", "data.batch_size=8", "run.max_steps=3"))
    assert max_diff(final_checkpoint(tmp_path / "acc")["model"], final_checkpoint(tmp_path / "big")["model"]) < 1e-5


def test_nonfinite_losses_are_skipped_then_abort(tmp_path):
    cfg = cfg_for(tmp_path, "nan", "optim.base_lr=1e30", "optim.lr_scaling=none", "dist.max_nonfinite=3",
                  "run.epochs=5", "model.norm=none")
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        fit(cfg)
    rows = [r for r in read_metrics(str(tmp_path / "nan")) if r["split"] == "train"]
    assert [r["skipped"] for r in rows][-3:] == [True, True, True]
    assert all(math.isnan(r["loss"]) for r in rows[-3:])


def test_skipped_step_leaves_weights_alone():
    cfg = config.load(None, ["data.name=synthetic", "model.gn_groups=8"])
    d = dist.setup(cfg.dist)
    torch.manual_seed(0)
    eng = engine.build(cfg, models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn",
                                         norm_kwargs={"groups": 8}), d)
    before = {k: v.clone() for k, v in eng.module.state_dict().items()}
    x = torch.randn(4, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    out = eng.train_step([(x, torch.zeros(4, dtype=torch.long))], lr=0.1)
    assert out.skipped and math.isnan(out.loss)
    assert all(torch.equal(before[k], v) for k, v in eng.module.state_dict().items())
    out = eng.train_step([(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))], lr=0.1)
    assert not out.skipped and math.isfinite(out.loss) and out.images == 4


def test_grad_clip_bounds_the_update():
    cfg = config.load(None, ["optim.grad_clip=0.01", "optim.momentum=0", "optim.weight_decay=0"])
    d = dist.setup(cfg.dist)
    torch.manual_seed(0)
    eng = engine.build(cfg, models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn",
                                         norm_kwargs={"groups": 8}), d)
    before = [p.detach().clone() for p in eng.module.parameters()]
    eng.train_step([(torch.randn(8, 3, 16, 16) * 10, torch.randint(0, 10, (8,)))], lr=1.0)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(eng.module.parameters(), before)))
    assert 0 < step.item() <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    res = fit(cfg_for(tmp_path, amp, f"precision.amp={amp}", "run.max_steps=4"))
    rows = [r for r in read_metrics(str(tmp_path / amp)) if r["split"] == "train"]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    assert res["n"] == 16


def test_norm_weight_decay_groups():
    m = models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn", norm_kwargs={"groups": 8})
    off = engine.param_groups(m, 1e-4, False)
    assert [g["weight_decay"] for g in off] == [1e-4, 0.0]
    assert len(off[1]["params"]) == 8  # 4 GN layers x (gamma, beta)
    on = engine.param_groups(m, 1e-4, True)
    assert len(on) == 1 and len(on[0]["params"]) == len(list(m.parameters()))


def test_run_folder_lock(tmp_path):
    fh = train.lock_run_dir(str(tmp_path / "x"), True)
    with pytest.raises(RuntimeError, match="in use by another run"):
        # a second holder in another process would be refused: flock is per open file description
        train.lock_run_dir(str(tmp_path / "x"), True)
    fh.close()
    train.lock_run_dir(str(tmp_path / "x"), True).close()


@pytest.mark.timeout(300)
def test_torch_compile_matches_eager(tmp_path):
    fit(cfg_for(tmp_path, "eager", "run.max_steps=2", "run.deterministic=false"))
    fit(cfg_for(tmp_path, "compiled", "run.max_steps=2", "model.compile=true", "run.deterministic=false"))
    a, b = final_checkpoint(tmp_path / "eager")["model"], final_checkpoint(tmp_path / "compiled")["model"]
    assert a.keys() == b.keys()  # the bare model is saved, no _orig_mod. prefix
    assert max_diff(a, b) < 1e-4


def test_resume_from_a_path_and_warn_on_changed_trajectory(tmp_path, capsys):
    fit(cfg_for(tmp_path, "a", "run.max_steps=2"))
    path = str(tmp_path / "a" / "checkpoints" / "ckpt_00000002.pt")
    capsys.readouterr()
    fit(cfg_for(tmp_path, "b", "run.max_steps=4", f"ckpt.resume={path}", "optim.base_lr=0.2"))
    out = capsys.readouterr().out
    assert f"resumed from {path} at step 2" in out
    assert "warning: resuming with optim.base_lr (0.1 -> 0.2) changed since the checkpoint" in out
    steps = [r["step"] for r in read_metrics(str(tmp_path / "b")) if r["split"] == "train"]
    assert steps == [3, 4]


def test_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, child_env, metrics, run

    args = [sys.executable, "-m", "imnet.train", "data.name=synthetic", "data.synthetic_size=512",
            "data.image_size=32", "data.batch_size=8", "model.gn_groups=8", "run.epochs=3", "log.every_steps=1",
            f"run.out_dir={tmp_path}", "run.name=sig", "log.progress=false", "ckpt.epoch_end=false"]
    p = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "sig" / "metrics.jsonl").exists() or not metrics(tmp_path / "sig"):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == dist.EXIT_STOPPED  # 75: stopped, not finished
    assert "stopped by signal at step" in out
    step = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert step < 3 * 64  # 512 images / 8 per batch = 64 steps an epoch
    assert sorted(os.listdir(tmp_path / "sig" / "checkpoints")) == [f"ckpt_{step:08d}.pt", f"ckpt_{step:08d}.pt.sha256",
                                                                    "latest"]
    resumed = run(args).stdout
    assert f"at step {step} " in resumed
    steps = [r["step"] for r in metrics(tmp_path / "sig") if r["split"] == "train"]
    assert steps == list(range(1, 3 * 64 + 1))  # every step once, none twice
