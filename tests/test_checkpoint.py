import os
import random
import subprocess

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
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000020.pt", "ckpt_00000020.pt.sha256", "ckpt_00000030.pt",
                                            "ckpt_00000030.pt.sha256", "latest"]


def test_truncated_file_is_never_latest(tmp_path):
    c = Checkpointer(str(tmp_path), keep=3)
    good = c.save(state(10), 10)
    # a crash in the middle of writing step 20: the bytes exist only under a temp name...
    data = open(good, "rb").read()
    (tmp_path / ".ckpt_00000020.pt.tmp-999").write_bytes(data[: len(data) // 2])
    (tmp_path / ".latest.tmp-999").write_bytes(b"ckpt_000")
    assert c.find_resume("auto") == good
    # ...and a fresh Checkpointer (the restarted run) removes the debris
    Checkpointer(str(tmp_path), keep=3)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # .latest.tmp-* too
    # even a truncated file under a checkpoint name (disk trouble) is not what `latest` names
    (tmp_path / "ckpt_00000020.pt").write_bytes(data[: len(data) // 2])
    assert c.find_resume("auto") == good
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        checkpoint.load(str(tmp_path / "ckpt_00000020.pt.bad"))


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


def three(tmp_path) -> tuple[Checkpointer, list[str], list[str]]:
    warned: list[str] = []
    c = Checkpointer(str(tmp_path), keep=3, warn=warned.append)
    return c, [c.save(state(s), s) for s in (10, 20, 30)], warned


def test_a_truncated_newest_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path):
    c, (_, p20, p30), warned = three(tmp_path)
    data = open(p30, "rb").read()
    open(p30, "wb").write(data[: len(data) // 2])
    assert c.find_resume("auto") == p20
    assert warned == [f"warning: checkpoint {p30}: its bytes do not match its checksum (ckpt_00000030.pt.sha256); "
                      "set aside as ckpt_00000030.pt.bad, trying the one before"]
    assert os.path.getsize(p30 + ".bad") == len(data) // 2  # kept for inspection, not deleted
    assert c.saved() == [str(tmp_path / "ckpt_00000010.pt"), p20]


def test_flipped_bytes_of_the_same_size_are_caught_by_the_checksum(tmp_path):
    c, (_, p20, p30), warned = three(tmp_path)
    data = bytearray(open(p30, "rb").read())
    assert torch.equal(checkpoint.load(p30)["model"]["w"], torch.full((3,), 30.0))
    i = bytes(data).index(torch.full((3,), 30.0).numpy().tobytes())  # the tensor's bytes inside the zip
    data[i + 5] ^= 0x10
    open(p30, "wb").write(bytes(data))
    assert not torch.equal(checkpoint.load(p30)["model"]["w"], torch.full((3,), 30.0))  # torch.load does not notice
    with pytest.raises(checkpoint.CheckpointError, match="its bytes do not match its checksum"):
        checkpoint.verify(p30)
    assert c.find_resume("auto") == p20
    # a checkpoint from before checksums: the zip's own CRC-32s catch the same flip
    os.replace(p30 + ".bad", p30)
    os.unlink(p30 + ".sha256")
    with pytest.raises(checkpoint.CheckpointError, match="does not match its CRC-32"):
        checkpoint.verify(p30)


def test_latest_with_garbage_or_an_older_name_is_a_warning_and_the_newest_whole_one_wins(tmp_path):
    c, (p10, _, p30), warned = three(tmp_path)
    (tmp_path / "latest").write_bytes(bytes(range(200, 256)))
    assert c.latest() is None and c.find_resume("auto") == p30
    assert warned == [f"warning: {tmp_path}/latest cannot be read (UnicodeDecodeError); resuming from the newest "
                      "whole checkpoint"]
    warned.clear()
    (tmp_path / "latest").write_text("ckpt_00000010.pt")
    assert c.find_resume("auto") == p30
    assert warned == ["warning: latest names ckpt_00000010.pt, but ckpt_00000030.pt is newer and whole: resuming "
                      "from it (to go back, give ckpt.resume=PATH)"]
    assert c.find_resume(p10) == p10  # an explicit path is taken as given, once verified


def test_a_full_disk_is_one_line_naming_the_folder_and_the_intact_checkpoint(tmp_path):
    """A 1 MiB tmpfs (root only: mount) fills up while the second, larger checkpoint is written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        c = Checkpointer(str(disk), keep=3)
        first = c.save({"w": torch.zeros(1000)}, 1)
        with pytest.raises(checkpoint.CheckpointError) as e:
            c.save({"w": torch.zeros(1_000_000)}, 2)  # 4 MB
        assert str(e.value) == (f"cannot write checkpoint ckpt_00000002.pt in {disk}: No space left on device; the "
                                "previous checkpoint ckpt_00000001.pt is intact")
        assert c.latest() == first and c.find_resume("auto") == first
        assert sorted(os.listdir(disk)) == ["ckpt_00000001.pt", "ckpt_00000001.pt.sha256", "latest"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_resume_and_evaluate_skip_a_damaged_newest_checkpoint(tmp_path, capsys):
    """End to end: a run with checkpoints at steps 2, 4, 6, 8 whose newest is truncated resumes from step 6
    and ends with the weights of the undamaged run; evaluate of the folder, which has no `latest`, takes
    the same file; evaluate of the damaged file itself is refused."""
    from conftest import cfg_for, fit, run, single

    from imnet import evaluate

    common = ["run.max_steps=8", "ckpt.every_steps=2", "ckpt.keep=5"]
    fit(cfg_for(tmp_path, "cut", *common))
    ck = tmp_path / "cut" / "checkpoints"
    whole = checkpoint.load(str(ck / "ckpt_00000008.pt"))
    data = (ck / "ckpt_00000008.pt").read_bytes()
    (ck / "ckpt_00000008.pt").write_bytes(data[:-100])
    os.unlink(ck / "latest")
    assert evaluate.resolve(str(ck)) == str(ck / "ckpt_00000006.pt")  # without `latest`, as resume does
    p = run(single("imnet.evaluate", "--checkpoint", str(ck / "ckpt_00000008.pt")), check=False)
    assert p.returncode == 2 and p.stderr.strip().endswith(
        f"error: {ck}/ckpt_00000008.pt: its bytes do not match its checksum (ckpt_00000008.pt.sha256)")
    capsys.readouterr()
    fit(cfg_for(tmp_path, "cut", *common))
    out, err = capsys.readouterr()
    assert (f"warning: checkpoint {ck}/ckpt_00000008.pt: its bytes do not match its checksum "
            "(ckpt_00000008.pt.sha256); set aside as ckpt_00000008.pt.bad, trying the one before") in err
    assert f"resumed from {ck}/ckpt_00000006.pt at step 6 " in out
    again = checkpoint.load(str(ck / "ckpt_00000008.pt"))
    assert all(torch.equal(v, whole["model"][k]) for k, v in again["model"].items())
    assert (ck / "ckpt_00000008.pt.bad").stat().st_size == len(data) - 100
