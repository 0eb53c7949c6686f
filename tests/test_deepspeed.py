"""dist.backend=deepspeed: the real CLI on 2 CPU ranks (gloo, loopback-only namespace) for ZeRO 0-3.

Every resume test runs a reference of 6 steps (checkpoints at steps 2, 4, 6; ckpt.keep=2), then builds the
run folder a run SIGKILLed right after step 4's checkpoint would leave (its ckpt_00000004.pt, the ds_00000004/
DeepSpeed folder it names, `latest`, plus an orphan DeepSpeed folder of a save that never got its .pt) and
runs the same command on it: it must resume from step 4 and end bit-identical to the reference (losses,
weights, every tensor of DeepSpeed's optimizer shards), with the orphan and old checkpoints pruned.
Settings exercise accumulation (2 micro-batches) and clipping (0.5, active: see the DDP control).
DeepSpeed's first run on a machine JIT-compiles a communication op (cached in TORCH_EXTENSIONS_DIR), so
the first test takes longer.
"""

import json
import math
import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT, metrics, run, single, torchrun, train_losses

from imnet import config, engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMMON = ["run.max_steps=6", "ckpt.every_steps=2", "ckpt.keep=2", "log.every_steps=1", "run.deterministic=true",
          "data.batch_size=4", "optim.accum_steps=2", "optim.grad_clip=0.5"]


def ds(stage: int, *more: str) -> list[str]:
    return ["dist.backend=deepspeed", f"dist.zero_stage={stage}", *more]


def ckpt_file(run_dir, step):
    return torch.load(os.path.join(run_dir, "checkpoints", f"ckpt_{step:08d}.pt"), weights_only=True)


def tensors(obj, path=""):
    """(path, tensor) for every tensor in a nested checkpoint object."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}/{i}")


def assert_same_deepspeed_folder(a, b):
    """Every tensor in every file of two DeepSpeed checkpoint folders is bit-identical."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and names
    for name in names:
        # DeepSpeed's own files hold Python objects besides tensors: not loadable with weights_only
        ta = dict(tensors(torch.load(os.path.join(a, name), weights_only=False)))
        tb = dict(tensors(torch.load(os.path.join(b, name), weights_only=False)))
        assert ta.keys() == tb.keys() and ta, name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}{k}"


def train_then_resume(tmp_path, small_run, name: str, *over: str):
    """The reference run, then the same command on the folder a run killed after step 4 leaves."""
    ref, cut = tmp_path / name, tmp_path / f"{name}_cut"
    run(torchrun(2, "imnet.train", *small_run(name, *COMMON, *over)))
    src, dst = ref / "checkpoints", cut / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copy(src / "ckpt_00000004.pt", dst)
    shutil.copytree(src / "ds_00000004", dst / "ds_00000004")
    (dst / "latest").write_text("ckpt_00000004.pt")
    (dst / "ds_00000005").mkdir()  # killed mid-save: shards without the .pt that would name them
    (dst / "ds_00000005" / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    out = run(torchrun(2, "imnet.train", *small_run(f"{name}_cut", *COMMON, *over))).stdout
    assert "resumed from" in out and "ckpt_00000004.pt at step 4 " in out, out[-2000:]
    return ref, cut


def assert_resumed_exactly(ref, cut):
    lr, lc = train_losses(ref), train_losses(cut)
    assert sorted(lr) == [1, 2, 3, 4, 5, 6] and sorted(lc) == [5, 6]  # none twice, none missing
    assert [lc[s] for s in (5, 6)] == [lr[s] for s in (5, 6)]  # exact
    a, b = ckpt_file(ref, 6), ckpt_file(cut, 6)
    assert a["step"] == b["step"] == 6 and a["deepspeed"] == b["deepspeed"] == "ds_00000006"
    for k, v in a["model"].items():
        assert v.dtype == torch.float32 or not v.is_floating_point()
        assert torch.equal(v, b["model"][k]), k
    assert_same_deepspeed_folder(ref / "checkpoints" / "ds_00000006", cut / "checkpoints" / "ds_00000006")
    for d in (ref, cut):  # keep=2: the DeepSpeed folders follow their .pt files; the orphan is gone
        names = set(os.listdir(d / "checkpoints"))
        assert {"ckpt_00000004.pt", "ckpt_00000006.pt", "ds_00000004", "ds_00000006", "latest"} <= names, names
        assert not {"ckpt_00000002.pt", "ds_00000002", "ds_00000005"} & names, names
        assert (d / "checkpoints" / "latest").read_text().strip() == "ckpt_00000006.pt"


def test_zero0_matches_ddp_and_resumes_exactly(tmp_path, small_run):
    ref, cut = train_then_resume(tmp_path, small_run, "z0", *ds(0))
    assert_resumed_exactly(ref, cut)
    # The same run on DDP. Measured on 2 ranks: losses within 2.4e-7, weights within 7.5e-9 (the global
    # grad norm for clipping is summed in another order; without clipping both are bit-identical).
    run(torchrun(2, "imnet.train", *small_run("ddp", *COMMON)))
    run(torchrun(2, "imnet.train", *small_run("ddp_noclip", *COMMON, "optim.grad_clip=0")))
    ld, lz = train_losses(tmp_path / "ddp"), train_losses(ref)
    assert sorted(ld) == sorted(lz) == [1, 2, 3, 4, 5, 6]
    assert [lz[s] for s in sorted(lz)] == pytest.approx([ld[s] for s in sorted(ld)], abs=1e-5, rel=0)
    wd, wz = ckpt_file(tmp_path / "ddp", 6)["model"], ckpt_file(ref, 6)["model"]
    assert wd.keys() == wz.keys()
    assert max((wd[k].double() - wz[k].double()).abs().max().item() for k in wd) < 1e-6
    # negative control: clipping is active here, so dropping it moves the losses far beyond the tolerance
    ln = train_losses(tmp_path / "ddp_noclip")
    assert max(abs(ln[s] - ld[s]) for s in ld) > 1e-3
    # a DeepSpeed checkpoint is not DDP's to resume (its optimizer state is in the sharded folder)
    p = run(single("imnet.train", *small_run("ddp_from_ds", *COMMON,
                                             f"ckpt.resume={ref / 'checkpoints' / 'ckpt_00000006.pt'}")), check=False)
    assert p.returncode != 0 and "was written by dist.backend=deepspeed" in p.stderr, p.stderr[-3000:]
    # the resolved DeepSpeed JSON in the run folder
    assert json.loads((ref / "deepspeed.json").read_text()) == {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5, "zero_optimization": {"stage": 0}, "bf16": {"enabled": False},
        "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True}


@pytest.mark.parametrize("stage,amp", [(1, "off"), (2, "bf16"), (3, "off")])
def test_zero_stage_resumes_exactly(tmp_path, small_run, stage, amp):
    over = ds(stage, "dist.deepspeed_config.zero_optimization.allgather_bucket_size=1000000")
    if stage == 1:
        over.append("model.channels_last=true")  # as in configs/digits_gn_deepspeed.yaml
    if amp != "off":
        over.append(f"precision.amp={amp}")
    ref, cut = train_then_resume(tmp_path, small_run, f"z{stage}", *over)
    assert_resumed_exactly(ref, cut)
    assert all(math.isfinite(x) for x in train_losses(ref).values())
    cfg = json.loads((ref / "deepspeed.json").read_text())
    assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"] == (amp == "bf16")
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 1000000  # the user's override
    if stage == 3:
        # ZeRO-3 shards the weights: the .pt holds them gathered, and `imnet.evaluate` on it sees the model
        # the run validated (through its gathered copy), every image once
        val = [r for r in metrics(ref) if r["split"] == "val"][-1]
        res = json.loads(run(single("imnet.evaluate", "--checkpoint", str(ref / "checkpoints"))).stdout
                         .strip().splitlines()[-1])
        assert res["n"] == val["n"] == 65 and res["step"] == 6
        assert res["top1"] == pytest.approx(val["top1"]) and res["loss"] == pytest.approx(val["loss"], rel=1e-5)


SKIP_SCRIPT = r"""
import sys, torch
from imnet import config, dist, engine, models, train
# import imnet (and build a DDP engine) without DeepSpeed
cfg = config.load(None, ["data.name=synthetic", "model.gn_groups=8"])
engine.build(cfg, models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn",
                               norm_kwargs={"groups": 8}), dist.setup(cfg.dist))
assert "deepspeed" not in sys.modules
d = None
for stage, amp in [(0, "off"), (1, "off"), (2, "off"), (3, "off"), (2, "bf16")]:
    ov = ["data.name=synthetic", "model.gn_groups=8", "dist.backend=deepspeed", f"dist.zero_stage={stage}",
          "optim.accum_steps=2"] + ([f"precision.amp={amp}"] if amp != "off" else [])
    cfg = config.load(None, ov)
    d = d or dist.setup(cfg.dist)
    torch.manual_seed(0)
    eng = engine.build(cfg, models.build("small", num_classes=10, in_channels=3, image_size=16, norm="gn",
                                         norm_kwargs={"groups": 8}), d)
    batch = lambda: (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    eng.train_step([batch(), batch()], lr=0.1)  # momentum exists now
    before = eng.state_dict()["model"]
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")  # in the second micro-batch: the first one's gradients must go too
    out = eng.train_step([batch(), (x, y)], lr=0.1)
    after = eng.state_dict()["model"]
    assert out.skipped and out.loss != out.loss, (stage, amp, out)
    assert all(torch.equal(before[k], after[k]) for k in before), (stage, amp)
    out = eng.train_step([batch(), batch()], lr=0.1)  # and the momentum was not poisoned
    assert not out.skipped and out.loss == out.loss, (stage, amp, out)
    assert all(torch.isfinite(v).all() for v in eng.state_dict()["model"].values() if v.is_floating_point())
    print("ok", stage, amp, flush=True)
dist.cleanup()
"""


def test_nonfinite_step_is_skipped_on_every_zero_stage():
    """A NaN in one micro-batch skips the whole step (all k micro-batches) at every ZeRO stage, fp32 and
    bf16, leaving weights and optimizer state as they were (one process; the flag is all-reduced like DDP's)."""
    out = run([sys.executable, "-c", SKIP_SCRIPT], timeout=300)
    assert out.stdout.count("ok ") == 5, out.stdout


def test_bad_combinations(tmp_path, small_run):
    # fp16 needs a GPU under DeepSpeed: known only at run time (dist.device=auto), a clear error then
    p = run(single("imnet.train", *small_run("fp16", *ds(0), "precision.amp=fp16", "run.max_steps=1")), check=False)
    assert p.returncode != 0
    assert "precision.amp=fp16 with dist.backend=deepspeed needs a GPU" in p.stderr, p.stderr[-3000:]
    # a wrong type for dist.zero_stage is imnet's: exit 2 before any process group, naming the key
    p = run(single("imnet.train", *small_run("bad", "dist.backend=deepspeed", "dist.zero_stage=two")), check=False)
    assert p.returncode == 2 and "dist.zero_stage" in p.stderr, p.stderr
    for ov, msg in [(["dist.backend=deepspeed", "dist.zero_stage=1.5"], "dist.zero_stage"),
                    (["dist.backend=deepspeed", "dist.zero_stage=true"], "dist.zero_stage"),
                    (["dist.backend=deepspeed", "dist.zero_stage=4"], "dist.zero_stage"),
                    (["dist.zero_stage=2"], "dist.zero_stage: 2 is only used by dist.backend=deepspeed"),
                    (["dist.deepspeed_config.bf16.enabled=true"], "dist.deepspeed_config: only used by"),
                    (["dist.backend=deepspeed", "dist.deepspeed_config=[1]"], "dist.deepspeed_config"),
                    (["dist.backend=deepspeed", "model.compile=true"], "model.compile")]:
        with pytest.raises(config.ConfigError, match=msg):
            config.load(None, ov)
    # an unknown key under dist.deepspeed_config is DeepSpeed's to judge, not imnet's
    cfg = config.load(None, ["dist.backend=deepspeed", "dist.deepspeed_config.zero_optimization.not_a_key=1"])
    assert engine.deepspeed_config(cfg, 2)["zero_optimization"] == {"stage": 0, "not_a_key": 1}


def test_deepspeed_json_from_config():
    cfg = config.load(os.path.join(ROOT, "configs", "digits_gn_deepspeed.yaml"),
                      ["optim.accum_steps=2", "optim.grad_clip=1.0", "precision.amp=bf16",
                       "dist.deepspeed_config.zero_optimization.overlap_comm=true",
                       "dist.deepspeed_config.communication_data_type=fp32",
                       "dist.deepspeed_config.gradient_accumulation_steps=2"])  # agreeing with imnet is fine
    assert engine.deepspeed_config(cfg, 4, n_params=1000) == {
        "train_batch_size": 32 * 2 * 4, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000, "overlap_comm": True},
        "bf16": {"enabled": True}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
        "communication_data_type": "fp32"}
    fp16 = engine.deepspeed_config(config.load(None, ["dist.backend=deepspeed", "precision.amp=fp16"]), 1)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    for ov, msg in [("gradient_accumulation_steps=4", "set optim.accum_steps instead"),
                    ("train_micro_batch_size_per_gpu=8", "set data.batch_size instead"),
                    ("zero_optimization.stage=2", "set dist.zero_stage instead"),
                    ("bf16.enabled=true", "set precision.amp instead"),
                    ("gradient_clipping=1.0", "set optim.grad_clip instead"),
                    ("optimizer.type=Adam", "imnet builds the optimizer"),
                    ("scheduler.type=WarmupLR", "imnet builds the optimizer")]:
        cfg = config.load(None, ["dist.backend=deepspeed", f"dist.deepspeed_config.{ov}"])
        with pytest.raises(RuntimeError, match=msg):
            engine.deepspeed_config(cfg, 2)
