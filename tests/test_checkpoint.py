import os
import random

import numpy as np
import pytest
import torch

from imnet import checkpoint
from imnet.checkpoint import Checkpointer


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"run": {"name": "x"}},
            "rng": [checkpoint.rng_state()]}


def test_save_moves_pointer_and_keeps_last_k(tmp_path):
    c = Checkpointer(str(tmp_path), keep=2)
    assert c.latest() is None and c.find_resume("auto") is None
    for s in (10, 20, 30):
        path = c.save(state(s), s)
        assert c.latest() == path
    assert [os.path.basename(p) for p in c.saved()] == ["ckpt_00000020.pt", "ckpt_00000030.pt"]
    loaded = checkpoint.load(c.latest())
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.full((3,), 30.0))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000020.pt", "ckpt_00000030.pt", "latest"]


def test_truncated_file_is_never_latest(tmp_path):
    c = Checkpointer(str(tmp_path), keep=3)
    good = c.save(state(10), 10)
    # a crash in the middle of writing step 20: the bytes exist only under a temp name...
    data = open(good, "rb").read()
    (tmp_path / ".ckpt_00000020.pt.tmp-999").write_bytes(data[: len(data) // 2])
    assert c.find_resume("auto") == good
    # ...and a fresh Checkpointer (the restarted run) removes the debris
    Checkpointer(str(tmp_path), keep=3)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))
    # even a truncated file under a checkpoint name (disk trouble) is not what `latest` names
    (tmp_path / "ckpt_00000020.pt").write_bytes(data[: len(data) // 2])
    assert c.find_resume("auto") == good
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        checkpoint.load(str(tmp_path / "ckpt_00000020.pt"))


def test_killed_between_rename_and_pointer(tmp_path):
    c = Checkpointer(str(tmp_path), keep=3)
    c.save(state(10), 10)
    os.unlink(tmp_path / "latest")
    assert c.find_resume("auto").endswith("ckpt_00000010.pt")


def test_resume_modes(tmp_path):
    c = Checkpointer(str(tmp_path), keep=3)
    p = c.save(state(10), 10)
    assert c.find_resume("never") is None
    assert c.find_resume(p) == p


def test_non_main_rank_writes_nothing(tmp_path):
    c = Checkpointer(str(tmp_path / "x"), keep=3, is_main=False)
    assert c.save(state(1), 1) is None
    assert not (tmp_path / "x").exists()


def test_rng_round_trip_through_weights_only_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    c = Checkpointer(str(tmp_path))
    c.save({"rng": checkpoint.rng_state()}, 1)
    expect = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    checkpoint.set_rng_state(checkpoint.load(c.latest())["rng"])
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expect[0], got[0])
    assert np.array_equal(expect[1], got[1])
    assert expect[2] == got[2]
