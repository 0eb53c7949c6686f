"""The README's first command, with fewer epochs, in a subprocess: 2 CPU ranks on digits."""

import re

import pytest
from conftest import metrics, run, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_readme_default_run(tmp_path):
    out = run(torchrun(2, "imnet.train", "--config", "configs/digits_gn.yaml", "run.epochs=3",
                       f"run.out_dir={tmp_path}"))
    m = re.search(r"final val top1 ([0-9.]+) top5 ([0-9.]+) loss ([0-9.]+) \(n=(\d+)\)", out.stdout)
    assert m, out.stdout[-2000:]
    top1, n = float(m.group(1)), int(m.group(4))
    assert n == 360
    assert top1 > 0.85, top1  # 3 of the 8 epochs; the full command reaches 0.95-0.97
    run_dir = tmp_path / "digits_gn"
    rows = metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(10, 67, 10))
    assert all(r["img_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert [r["step"] for r in rows if r["split"] == "val"] == [22, 44, 66]
    assert (run_dir / "config.yaml").exists() and (run_dir / "run_info.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "ckpt_00000022.pt", "ckpt_00000022.pt.sha256", "ckpt_00000044.pt", "ckpt_00000044.pt.sha256",
        "ckpt_00000066.pt", "ckpt_00000066.pt.sha256", "latest"]


def test_bad_override_fails_before_training(tmp_path):
    p = run(torchrun(1, "imnet.train", "--config", "configs/digits_gn.yaml", "optim.lr=0.1",
                     f"run.out_dir={tmp_path}"), check=False)
    assert p.returncode != 0
    assert "optim.lr: unknown key" in p.stderr
    assert not (tmp_path / "digits_gn").exists()


def test_missing_dataset_says_where_it_looked(tmp_path):
    p = run(["python", "-m", "imnet.train", "data.name=mnist", f"data.root={tmp_path}/nowhere",
             f"run.out_dir={tmp_path}"], check=False)
    assert p.returncode != 0
    assert "nowhere" in p.stderr and "imnet.download" in p.stderr


def test_a_data_error_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "not_a_folder"
    bad.write_text("x")
    p = run(["python", "-m", "imnet.train", "data.name=cifar10", f"data.root={bad}", f"run.out_dir={tmp_path}"],
            check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (f"imnet.train: error: data.root {bad} is a file, not a folder: set it "
                                                 "to the folder that holds the cifar10 files")
