import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from imnet import config, sweep
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
    with pytest.raises(ValidationError, match="frozen"):
        cfg.data.batch_size = 3


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_shipped_configs_validate():
    files = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
    assert len(files) >= 8
    for f in files:
        config.load(f)


def test_shipped_sweeps_validate_every_point():
    files = {os.path.basename(f): f for f in glob.glob(os.path.join(CONFIGS, "sweeps", "*.yaml"))}
    assert {"r50_batch.yaml", "cifar10_batch.yaml", "svhn_batch.yaml"} <= set(files)
    for f in files.values():  # every sweep, also those not listed below
        assert sweep.resolve_points(sweep.load_sweep(f), None, [])
    batches = [32, 16, 8, 4, 2]
    for name, norms, arch in (("r50_batch", ["bn", "syncbn", "gn"], "resnet50"),
                              ("cifar10_batch", ["gn", "bn", "syncbn"], "resnet20"),
                              ("svhn_batch", ["gn", "bn", "syncbn"], "small")):
        points = sweep.resolve_points(sweep.load_sweep(files[name + ".yaml"]), None, [])
        assert [(p["model.norm"], p["data.batch_size"]) for p, _ in points] == [(n, b) for n in norms for b in batches]
        for point, cfg in points:
            assert (cfg.model.norm, cfg.data.batch_size, cfg.model.arch) == (point["model.norm"],
                                                                               point["data.batch_size"], arch)
            assert cfg.optim.lr_scaling == "linear"  # the rate follows the global batch
            assert cfg.run.name == f"{name}/{sweep.point_name(point)}"
    r50 = sweep.resolve_points(sweep.load_sweep(files["r50_batch.yaml"]), None, [])
    assert all(cfg.data.name == "imagenet" and cfg.optim.milestones == (30, 60, 90) for _, cfg in r50)
    assert {cfg.data.name for _, cfg in sweep.resolve_points(sweep.load_sweep(files["svhn_batch.yaml"]), None, [])} \
        == {"svhn"}


@pytest.mark.parametrize("norm", ["bn", "syncbn", "gn"])
def test_r50_configs_carry_the_papers_recipe(norm):
    """Wu & He 2018, sec. 4.1: 100 epochs, lr 0.1 per 256 images (32 per GPU on 8 GPUs), x0.1 at
    30/60/90, weight decay 1e-4 on every weight including gamma and beta, gamma = 0 in each block's
    last norm, G = 32; no warmup."""
    cfg = config.load(os.path.join(CONFIGS, f"r50_{norm}.yaml"))
    assert (cfg.model.arch, cfg.model.norm, cfg.data.name) == ("resnet50", norm, "imagenet")
    assert cfg.run.epochs == 100
    assert cfg.data.batch_size == 32
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9
    assert cfg.optim.base_lr == 0.1 and cfg.optim.lr_scaling == "linear"
    assert cfg.optim.schedule == "step" and cfg.optim.milestones == (30, 60, 90) and cfg.optim.gamma == 0.1
    assert cfg.optim.warmup_epochs == 0
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.optim.norm_weight_decay is True
    assert cfg.model.zero_init_last is True
    assert cfg.model.gn_groups == 32 and cfg.model.gn_channels_per_group is None
    assert cfg.optim.label_smoothing == 0


def test_validation_builds_no_model():
    """Checking GN groups and BatchNorm at one image reads imnet.arch's tables: neither torch nor imnet.models
    is imported, in a fresh interpreter."""
    code = ("import sys; from imnet import config; "
            "config.load(None, ['model.arch=resnet50', 'model.norm=bn', 'data.batch_size=1']); "
            "config.load(None, ['model.arch=resnet20', 'model.gn_channels_per_group=16']); "
            "print(sorted(m for m in ('torch', 'imnet.models', 'imnet.norm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- 1 image per rank ------------------------------------------------------------------------

def test_bn_at_one_image_before_the_pool_is_refused_at_config_time():
    msg = ("data.batch_size: 1 image per rank with model.norm=bn: layer features.11 (BatchNorm2d(512)) feeds the "
           "global average pool, which then returns its beta whatever the image (one image's map normalized over "
           "H x W averages to 0), so no layer before it can learn; use model.norm=gn (or syncbn on 2+ ranks) or "
           "data.batch_size >= 2")
    for over in (["data.name=mnist"], ["data.name=svhn"], ["data.image_size=28"]):  # small net at 28 and 32 px
        with pytest.raises(ConfigError) as e:
            config.load(None, over + ["model.norm=bn", "data.batch_size=1"])
        assert str(e.value) == msg


def test_bn_at_one_image_on_a_1x1_map_is_refused_at_config_time():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["model.arch=resnet18", "model.norm=bn", "data.batch_size=1", "data.image_size=8"])
    assert str(e.value) == (
        "data.batch_size: 1 image per rank with model.norm=bn: layer layer4.0.bn1 (BatchNorm2d(512)) and 4 later "
        "norm layers see a 1x1 map at 8x8 px input, one value per channel, which BatchNorm cannot train on; use "
        "model.norm=gn (or syncbn on 2+ ranks), data.batch_size >= 2, or data.image_size >= 9")
    with pytest.raises(ConfigError, match=r"^data\.image_size: 15 px is too small for model\.arch=small"):
        config.load(None, ["model.norm=bn", "data.batch_size=1", "data.image_size=15"])


@pytest.mark.parametrize("over", [
    ["model.arch=resnet18", "data.image_size=9"],      # every map 2x2 or more
    ["model.arch=resnet20", "data.name=cifar10"],
    ["model.arch=resnet50", "data.name=tiny_imagenet"],
    ["data.name=mnist", "model.norm=gn"],              # GN: any map
    ["data.name=mnist", "model.norm=syncbn"],          # syncbn: judged when the world is known
    ["data.name=h5"],                                  # h5: judged when the file's size is known
    ["data.name=mnist", "data.batch_size=2"],
])
def test_one_image_setups_that_pass_config_time(over):
    cfg = config.load(None, ["model.norm=bn", "data.batch_size=1"] + over)  # later overrides win
    assert cfg.data.batch_size == (2 if "data.batch_size=2" in over else 1)
    assert cfg.model.norm == next((o.split("=")[1] for o in over if o.startswith("model.norm=")), "bn")


def test_native_image_sizes_are_the_datasets():
    from imnet.data import datasets

    assert tuple(config.NATIVE_IMAGE_SIZE) == datasets.NAMES
    for name in ("digits", "synthetic"):  # the two that need no files
        _, info = datasets.build_dataset(name, "unused", "val", augment=False)
        assert info.image_size == config.NATIVE_IMAGE_SIZE[name]
    assert config.image_size(config.load(None, ["data.name=mnist"]).data) == 28
    assert config.image_size(config.load(None, ["data.name=mnist", "data.image_size=40"]).data) == 40
    assert config.image_size(config.load(None, ["data.name=h5"]).data) is None


def test_yaml_1_1_words_stay_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("precision:\n  amp: off\nrun:\n  deterministic: true\n")
    cfg = config.load(str(p), ["run.name=no", "model.channels_last=True"])
    assert cfg.precision.amp == "off" and cfg.run.deterministic is True
    assert cfg.run.name == "no" and cfg.model.channels_last is True
    assert config.load(None, ["precision.amp=off"]).precision.amp == "off"


# --- bad input in the file and on the command line: one line naming the file, the line and the key -----------

def write(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def load_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(path, list(overrides))
    return str(e.value)


def test_a_second_section_block_is_a_duplicate_key(tmp_path):
    p = write(tmp_path, "optim:\n  base_lr: 0.2\ndata:\n  batch_size: 8\n\n# later\noptim:\n  momentum: 0.5\n")
    assert load_error(p) == f"--config {p}: line 7: duplicate key 'optim' (first at line 1)"


def test_a_key_twice_in_one_section_is_a_duplicate_key(tmp_path):
    p = write(tmp_path, "run:\n  epochs: 2\noptim:\n  base_lr: 0.2\n  momentum: 0.5\n  base_lr: 0.3\n")
    assert load_error(p) == f"--config {p}: line 6: duplicate key 'base_lr' (first at line 4)"


def test_a_yaml_syntax_error_is_one_line(tmp_path):
    p = write(tmp_path, "optim:\n  base_lr: [0.2\n")
    assert load_error(p) == (f"--config {p}: not valid YAML: line 3, column 1: expected ',' or ']', "
                             "but got '<stream end>'")


def test_a_python_tag_is_refused_and_not_run(tmp_path):
    flag = tmp_path / "pwned"
    p = write(tmp_path, f"run:\n  name: !!python/object/apply:os.system [\"touch {flag}\"]\n")
    assert load_error(p) == f"--config {p}: line 2: unsafe/unsupported YAML tag '!!python/object/apply:os.system'"
    assert not flag.exists()


def test_a_value_its_tag_cannot_read(tmp_path):
    p = write(tmp_path, "run:\n  epochs: !!int abc\n")
    assert load_error(p) == f"--config {p}: line 2: cannot read !!int 'abc'"


def test_a_control_byte_in_the_file(tmp_path):
    p = write(tmp_path, "run:\n  name: a\x01\n")
    assert load_error(p) == (f"--config {p}: not valid YAML: line 2: unacceptable character #x0001: special "
                             "characters are not allowed")


def test_a_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"run:\n  name: caf\xe9\n")
    assert load_error(str(p)) == (f"--config {p}: not valid YAML: line 2: unacceptable character #x00e9: invalid "
                                  "continuation byte")


def test_a_section_given_as_a_scalar_in_the_file(tmp_path):
    p = write(tmp_path, "optim:\n  base_lr: 0.2\nrun: 5\n")
    assert load_error(p) == f"--config {p}: line 3: run: expected a mapping of keys (a section), got 5"


def test_a_section_given_as_a_scalar_in_the_file_with_an_override_of_its_keys(tmp_path):
    p = write(tmp_path, "run: 5\n")  # the override must not silently replace it
    assert load_error(p, ["run.name=x"]) == \
        f"--config {p}: line 1: run: expected a mapping of keys (a section), got 5"


def test_a_section_given_as_a_list_in_the_file(tmp_path):
    p = write(tmp_path, "data:\n  - batch_size: 8\n")
    assert load_error(p) == (f"--config {p}: line 1: data: expected a mapping of keys (a section), "
                             "got [{'batch_size': 8}]")


def test_a_section_set_to_a_scalar_on_the_command_line():
    assert load_error(None, ["run=5"]) == "run: expected a mapping of keys (a section), got 5"


CONTROL = "contains a control character (newline, tab, ...)"
NAME_RULE = ("expected a folder name, or names joined by '/' such as a sweep's <sweep>/<point>, none of them empty, "
             "'.' or '..' (the run folder is run.out_dir/run.name)")


def test_run_name_with_a_newline():
    assert load_error(None, ['run.name="a\\nb"']) == rf"run.name: 'a\nb' {CONTROL}"


def test_run_name_with_a_newline_in_the_file(tmp_path):
    p = write(tmp_path, 'run:\n  name: "a\\nb"\n')
    assert load_error(p) == rf"run.name: 'a\nb' {CONTROL}"


def test_run_name_with_a_tab():
    assert load_error(None, ['run.name="a\\tb"']) == rf"run.name: 'a\tb' {CONTROL}"


def test_run_name_with_a_nul_or_del():
    assert load_error(None, ['run.name="a\\0b"']) == rf"run.name: 'a\x00b' {CONTROL}"
    assert load_error(None, ['run.name="a\\x7fb"']) == rf"run.name: 'a\x7fb' {CONTROL}"


def test_run_name_empty():
    assert load_error(None, ["run.name="]) == "run.name: must not be empty"


def test_run_name_outside_the_out_dir():
    assert load_error(None, ["run.name=../x"]) == f"run.name: '../x': {NAME_RULE}"


def test_run_name_absolute():
    assert load_error(None, ["run.name=/abs"]) == f"run.name: '/abs': {NAME_RULE}"


@pytest.mark.parametrize("name", [".", "a/", "a//b", "a/./b", "a/.."])
def test_run_name_with_an_empty_dot_or_dotdot_part(name):
    assert load_error(None, [f"run.name={name}"]) == f"run.name: {name!r}: {NAME_RULE}"


@pytest.mark.parametrize("name", ["gn_b32", "sweep/norm=gn,batch_size=2,seed=0", "a/b/c", "..x", "a b"])
def test_run_names_that_are_allowed(name):
    assert config.load(None, [f"run.name={json.dumps(name)}"]).run.name == name


def test_run_out_dir_with_a_newline():
    assert load_error(None, ['run.out_dir="runs\\nx"']) == rf"run.out_dir: 'runs\nx' {CONTROL}"


def test_run_out_dir_empty():
    assert load_error(None, ["run.out_dir="]) == "run.out_dir: must not be empty"


def test_overrides_stay_yaml_scalars():
    cfg = config.load(None, ["run.name=s/p", "optim.base_lr=1e-2", "run.deterministic=true", "optim.betas=[0.8, 0.9]"])
    assert (cfg.run.name, cfg.optim.base_lr, cfg.run.deterministic, cfg.optim.betas) == ("s/p", 0.01, True, (0.8, 0.9))
    assert load_error(None, ["optim.betas=[0.8"]) == ("optim.betas: cannot parse value '[0.8': not valid YAML: line 1, "
                                                      "column 5: expected ',' or ']', but got '<stream end>'")


def test_shipped_yaml_files_have_no_duplicate_keys():
    files = glob.glob(os.path.join(CONFIGS, "*.yaml")) + glob.glob(os.path.join(CONFIGS, "sweeps", "*.yaml"))
    assert len(files) >= 13
    for f in files:
        assert isinstance(config.read_yaml(f), dict), f
