import pytest
import yaml

from imnet import config
from imnet.config import ConfigError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = config.load()
    assert cfg.data.batch_size == 32 and cfg.model.norm == "gn"
    p = tmp_path / "c.yaml"
    p.write_text(config.to_yaml(cfg))
    assert config.load(str(p)) == cfg


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  base_lr: 0.2\ndata:\n  batch_size: 8\n")
    cfg = config.load(str(p), ["data.batch_size=4", "optim.milestones=[1, 2]", "optim.schedule=step",
                               "run.epochs=3", "run.name=7"])
    assert cfg.optim.base_lr == 0.2
    assert cfg.data.batch_size == 4
    assert cfg.optim.milestones == (1, 2)
    assert cfg.run.name == "7"


@pytest.mark.parametrize("override,needle", [
    (["optim.lr=0.1"], "optim.lr: unknown key"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=abc"], "data.batch_size"),
    (["model.norm=batchnorm"], "model.norm"),
    (["model.arch=resnet20", "model.gn_groups=32"], "model.gn_groups"),
    (["model.gn_groups=3"], "model.gn_groups"),
    (["model.gn_channels_per_group=48"], "model.gn_channels_per_group"),
    (["optim.schedule=step", "optim.milestones=[30]", "run.epochs=10"], "optim.milestones"),
    (["optim.warmup_epochs=5", "run.epochs=5"], "optim.warmup_epochs"),
    (["ckpt.resume=/no/such/file.pt"], "ckpt.resume"),
    (["bogus.key=1"], "bogus: unknown key"),
    (["data=3"], "data"),
    (["nokey"], "expected key.sub=value"),
])
def test_errors_name_the_key_path(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        config.load(None, override)


def test_gn_groups_that_divide_are_fine():
    cfg = config.load(None, ["model.arch=resnet20", "model.gn_groups=8"])
    assert cfg.model.gn_groups == 8
    cfg = config.load(None, ["model.arch=resnet50", "model.gn_channels_per_group=16"])
    assert cfg.model.gn_channels_per_group == 16


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"model": {"norm": "gn", "grops": 8}}))
    with pytest.raises(ConfigError, match=r"model\.grops: unknown key"):
        config.load(str(p))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        config.load("/nonexistent.yaml")


def test_frozen():
    cfg = config.load()
    with pytest.raises(Exception):
        cfg.data.batch_size = 3


def test_shipped_configs_validate():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert files
    for f in files:
        config.load(f)


def test_yaml_1_1_words_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("precision:\n  amp: off\nrun:\n  deterministic: true\n")
    cfg = config.load(str(p), ["run.name=no", "model.channels_last=True"])
    assert cfg.precision.amp == "off" and cfg.run.deterministic is True
    assert cfg.run.name == "no" and cfg.model.channels_last is True
    assert config.load(None, ["precision.amp=off"]).precision.amp == "off"
