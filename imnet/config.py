"""The typed config tree: defaults in the classes, YAML for what differs, dotted overrides on the CLI.

    cfg = load("configs/digits_gn.yaml", ["optim.base_lr=0.2", "data.batch_size=16"])

Every section forbids unknown keys and checks types and ranges, so a typo such as
`optim.lr=0.1` (the key is `base_lr`) is an error that names the key path, before any process
starts. Cross-field checks (GN groups must divide every norm's channels, schedule milestones must
fall inside the run) live in `Config._check`; the norms' channels and map sizes come from imnet.arch's
arithmetic, so validating builds no model and imports no torch. The resolved tree is saved with every run.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imnet import arch
from imnet.arch import Arch

# a newline would end a line of a batch script or a log line; no name needs any of these
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class Section(BaseModel):
    # extra="forbid": an unknown key is an error, never silently ignored.
    # coerce_numbers_to_str: `run.name=2` is a name, not a type error.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, coerce_numbers_to_str=True)


class RunCfg(Section):
    name: str = "run"
    out_dir: str = "runs"          # the run folder is out_dir/name
    seed: int = 0
    deterministic: bool = False    # torch.use_deterministic_algorithms + no cudnn autotune
    epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)  # stop after this many optimizer steps (None: all epochs)
    eval_every: int = Field(1, ge=0)  # validate every this many epochs, and at the end (0: only at the end)
    cuda_graph: bool = False       # replay the whole step as one CUDA graph (engine/graph.py says where it applies)

    @field_validator("out_dir")
    @classmethod
    def _out_dir(cls, v: str) -> str:
        return _text(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # one folder below out_dir, or several joined by '/' (a sweep's <sweep>/<point>), never outside it
        if any(part in ("", ".", "..") or os.sep in part for part in _text(v).split("/")):
            raise ValueError(f"{v!r}: expected a folder name, or names joined by '/' such as a sweep's "
                             f"<sweep>/<point>, none of them empty, '.' or '..' (the run folder is "
                             f"run.out_dir/run.name)")
        return v


def _text(v: str) -> str:
    if not v:
        raise ValueError("must not be empty")
    if CONTROL_RE.search(v):
        raise ValueError(f"{v!r} contains a control character (newline, tab, ...)")
    return v


class DataCfg(Section):
    name: Literal["synthetic", "digits", "mnist", "fashion", "cifar10", "svhn", "imagenet", "tiny_imagenet",
                  "h5"] = "digits"
    root: str = "data"
    batch_size: int = Field(32, gt=0)                 # images per rank per micro-batch
    eval_batch_size: Optional[int] = Field(None, gt=0)  # None: 2 x batch_size
    workers: int = Field(0, ge=0)                     # DataLoader worker processes per rank
    image_size: Optional[int] = Field(None, gt=0)     # None: the dataset's native size (224 for imagenet)
    augment: bool = True
    # random horizontal flip when training. auto: where a mirror keeps the class (CIFAR-10, ImageNet, Tiny
    # ImageNet: on; digits, MNIST, Fashion, SVHN: off; h5: the file's `hflip` attribute, off without one)
    hflip: Literal["auto", "on", "off"] = "auto"
    # px of zero padding around the random crop of the small-image recipe (every set but imagenet, whose
    # recipe is a random-resized crop); None: 4 px per 32 px of side; 0: no crop jitter
    crop_pad: Optional[int] = Field(None, ge=0)
    loader: Literal["torch", "dali", "gpu"] = "torch"  # gpu: the whole uint8 set resident on the device
    on_bad_image: Literal["error", "skip"] = "error"  # skip: replace an unreadable image, count and log it
    dali_hw_decoder_load: float = Field(0.65, ge=0, le=1)  # share of JPEGs for the A100/H100 hardware decoder
    # synthetic data only
    synthetic_size: int = Field(1024, gt=0)           # train images (val gets a quarter)
    synthetic_classes: int = Field(10, gt=1)
    synthetic_channels: int = Field(3, gt=0)


class ModelCfg(Section):
    arch: Arch = "small"
    norm: Literal["bn", "syncbn", "gn", "ln", "in", "none"] = "gn"
    gn_groups: int = Field(32, gt=0)
    gn_channels_per_group: Optional[int] = Field(None, gt=0)  # wins over gn_groups when set
    # GroupNorm for gn/ln/in: triton = imnet.kernels' channels-last kernels on CUDA (native math on
    # the CPU); auto = triton where Triton imports and supports the GPU (NVIDIA, compute capability
    # >= 8.0), else native (torch's nn.GroupNorm).
    gn_impl: Literal["auto", "triton", "native"] = "auto"
    norm_eps: float = Field(1e-5, gt=0)
    zero_init_last: bool = True    # gamma = 0 in the last norm of each residual block
    channels_last: bool = False
    compile: bool = False          # torch.compile the model


class OptimCfg(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = Field(0.1, gt=0)   # for a global batch of 256 (scaled linearly, see lr_scaling)
    lr_scaling: Literal["linear", "none"] = "linear"  # linear: lr = base_lr * global_batch / 256
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    weight_decay: float = Field(1e-4, ge=0)
    norm_weight_decay: bool = False     # apply weight decay to norm gammas/betas too
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    accum_steps: int = Field(1, gt=0)   # micro-batches per optimizer step
    grad_clip: float = Field(0.0, ge=0)  # max global grad norm (0: off)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: tuple[float, ...] = ()  # step schedule: epochs at which lr *= gamma
    gamma: float = Field(0.1, gt=0)
    min_lr: float = Field(0.0, ge=0)    # cosine floor, absolute lr


class PrecisionCfg(Section):
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast dtype; fp16 adds a GradScaler
    init_scale: float = Field(2.0**16, gt=0)    # fp16 GradScaler's initial scale


class DistCfg(Section):
    # auto: nccl on GPU, gloo on CPU. deepspeed: the DeepSpeed engine (pip install ".[deepspeed]") over
    # the same process group (nccl on GPU, gloo on CPU) instead of DDP.
    backend: Literal["auto", "gloo", "nccl", "deepspeed"] = "auto"
    zero_stage: int = Field(0, ge=0, le=3, strict=True)  # deepspeed only: ZeRO stage 0-3
    # deepspeed only: deep-merged over the DeepSpeed JSON imnet generates from this config (see
    # engine.deepspeed_config), e.g. {"zero_optimization": {"overlap_comm": true}}. Free-form on purpose:
    # it is DeepSpeed's own schema, checked by DeepSpeed when the engine starts (its sections reject
    # unknown keys; its top level ignores them). A value contradicting what imnet derives from its own
    # keys (batch sizes, accumulation, clipping, ZeRO stage, bf16/fp16) or an optimizer/scheduler is an
    # error naming the imnet key to set instead.
    deepspeed_config: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # a rank that waits this long in one training step names the rank it waits for and fails the job
    # (imnet/heartbeat.py); the process group's own timeout is 30 s later
    timeout_s: int = Field(1800, gt=0)
    sync_bn_stats: bool = True       # average BN running stats over ranks before evaluating/saving
    max_nonfinite: int = Field(5, gt=0)  # abort after this many non-finite losses in a row


class CkptCfg(Section):
    every_steps: int = Field(0, ge=0)   # also save every N optimizer steps (0: only at epoch ends)
    epoch_end: bool = True
    keep: int = Field(3, gt=0)          # keep the newest K checkpoints
    resume: str = "auto"                # auto (latest in the run folder, if any) | never | PATH


class LogCfg(Section):
    every_steps: int = Field(10, gt=0)  # train metrics to every sink every N optimizer steps
    progress: bool = True               # tqdm bar on rank 0
    # W&B (pip install ".[wandb]"): off | offline (files in runs/<name>/wandb/, `wandb sync` later) | online.
    # WANDB_MODE and the other WANDB_* variables keep their meaning (WANDB_MODE=disabled wins).
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: Optional[str] = None  # None: $WANDB_PROJECT, else "imnet"
    wandb_entity: Optional[str] = None
    wandb_tags: tuple[str, ...] = ()    # added to the tags imnet sets (norm, images per GPU, dataset, ...)
    tensorboard: bool = False           # event files in runs/<name>/tb/ (pip install ".[tensorboard]")


class Config(Section):
    run: RunCfg = RunCfg()
    data: DataCfg = DataCfg()
    model: ModelCfg = ModelCfg()
    optim: OptimCfg = OptimCfg()
    precision: PrecisionCfg = PrecisionCfg()
    dist: DistCfg = DistCfg()
    ckpt: CkptCfg = CkptCfg()
    log: LogCfg = LogCfg()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        m = self.model
        if m.norm in ("gn",):
            for c in sorted(arch.norm_channels(m.arch)):
                try:
                    arch.num_groups(c, m.gn_groups, m.gn_channels_per_group)
                except ValueError as e:
                    key = "model.gn_channels_per_group" if m.gn_channels_per_group else "model.gn_groups"
                    raise ValueError(f"{key}: {e} (arch {m.arch} has norms with {c} channels)") from None
        size = image_size(self.data)
        if size is not None:  # h5 without data.image_size, and syncbn's world: checked at models.from_config
            arch.check_batch_stats(m.arch, m.norm, size, self.data.batch_size)
        for ms in self.optim.milestones:
            if not 0 < ms < self.run.epochs:
                raise ValueError(f"optim.milestones: milestone {ms} is outside the run "
                                 f"(0, run.epochs={self.run.epochs})")
        if list(self.optim.milestones) != sorted(self.optim.milestones):
            raise ValueError(f"optim.milestones: must be increasing, got {list(self.optim.milestones)}")
        if self.optim.milestones and self.optim.schedule != "step":
            raise ValueError("optim.milestones: only used by optim.schedule=step")
        if self.optim.warmup_epochs >= self.run.epochs:
            raise ValueError(f"optim.warmup_epochs: {self.optim.warmup_epochs} is not shorter than "
                             f"run.epochs={self.run.epochs}")
        ds = self.dist
        if ds.backend != "deepspeed":  # DeepSpeed-only keys set for DDP would be silently ignored
            if ds.zero_stage:
                raise ValueError(f"dist.zero_stage: {ds.zero_stage} is only used by dist.backend=deepspeed")
            if ds.deepspeed_config:
                raise ValueError("dist.deepspeed_config: only used by dist.backend=deepspeed")
        elif self.model.compile:
            raise ValueError("model.compile: not supported with dist.backend=deepspeed (use the DDP backends)")
        if self.data.crop_pad is not None and self.data.name == "imagenet":
            raise ValueError("data.crop_pad: imagenet trains with a random-resized crop, not a padded crop")
        if self.data.loader == "dali" and self.data.on_bad_image == "skip":
            # DALI decodes a whole batch inside its pipeline: a file that fails stops the pipeline, and there
            # is no slot-for-slot replacement as in the torch loader (same step counts on every rank)
            raise ValueError("data.on_bad_image=skip: the DALI loader cannot replace an unreadable image; find the "
                             "bad files with python -m imnet.data.check ROOT and fix or remove them, or use "
                             "data.loader=torch")
        r = self.ckpt.resume
        if r not in ("auto", "never") and not os.path.isfile(r):
            raise ValueError(f"ckpt.resume: {r!r} is neither auto, never nor an existing checkpoint file")
        return self


# The side (px) of the images each dataset yields when data.image_size is None; h5: only its file knows.
NATIVE_IMAGE_SIZE = {"synthetic": 32, "digits": 32, "mnist": 28, "fashion": 28, "cifar10": 32, "svhn": 32,
                     "imagenet": 224, "tiny_imagenet": 64, "h5": None}


def image_size(data: DataCfg) -> int | None:
    """The side (px) of the images the model will see, or None where only the files know it (h5)."""
    return data.image_size or NATIVE_IMAGE_SIZE[data.name]


class ConfigError(ValueError):
    """A config problem; the message names the key path."""


def _format(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "model_type":  # e.g. `run=5`
            msg = f"expected a mapping of keys (a section), got {e['input']!r}"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            if path == "<root>":  # cross-field checks carry their own key path
                lines.append(msg)
                continue
        lines.append(f"{prefix}{path}: {msg}")
    return "; ".join(lines)


class _YAMLProblem(yaml.MarkedYAMLError):
    """What imnet refuses in well-formed YAML, at its line: a duplicate key, a tag, a value its tag cannot read."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


def _tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!", 1)


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans, which
    would turn `precision.amp: off` into False. A duplicate key is an error (PyYAML keeps the last
    one silently: a second `optim:` block would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:  # before merge keys (<<) are flattened: keys may override merged ones
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                    if key in first:
                        raise _YAMLProblem(f"duplicate key {key!r} (first at line {first[key]})", key_node.start_mark)
                    first[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_undefined(self, node):  # SafeLoader's refusal, e.g. !!python/object/apply, with its line
        raise _YAMLProblem(f"unsafe/unsupported YAML tag {_tag(node.tag)!r}", node.start_mark)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError):  # e.g. `!!int abc`: int("abc")
            value = f" {node.value!r}" if isinstance(node, yaml.ScalarNode) else ""
            raise _YAMLProblem(f"cannot read {_tag(node.tag)}{value}", node.start_mark) from None


_Loader.add_constructor(None, _Loader.construct_undefined)
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _problem(e: yaml.YAMLError) -> str:
    """One line: where and what."""
    if isinstance(e, _YAMLProblem):
        return f"line {e.problem_mark.line + 1}: {e.problem}"
    if isinstance(e, yaml.reader.ReaderError):  # bytes PyYAML cannot read as text: it knows the offset only
        return f"not valid YAML: position {e.position}: {str(e).splitlines()[0]}"
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return "not valid YAML: " + " ".join(str(e).split())


def _read_yaml(path: str, option: str) -> tuple[Any, dict]:
    """(the file's data, {top-level key: its line})."""
    with open(path, "rb") as f:  # bytes: PyYAML names an encoding problem like any other
        text = f.read()
    try:
        loader = _Loader(text)  # reads the encoding already
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as e:  # no mark: its position counts characters, or bytes where decoding failed
        before = text.decode("utf-8", "replace")[:e.position] if e.encoding == "unicode" else text[:e.position]
        line = before.count("\n" if isinstance(before, str) else b"\n") + 1
        raise ConfigError(f"{option} {path}: not valid YAML: line {line}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{option} {path}: {_problem(e)}") from None
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    return data, lines


def read_yaml(path: str, option: str = "--config") -> Any:
    """A YAML file's data; a duplicate key, a tag SafeLoader refuses or a syntax error is a one-line
    ConfigError `OPTION FILE: ...` naming the line."""
    return _read_yaml(path, option)[0]


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["optim.base_lr=0.2", "run.name=x"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.strip() != key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {_problem(e)}") from None
        _set(tree, key, value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    except ValueError as e:  # raised outside pydantic's wrapping (should not happen, but name it)
        raise ConfigError(str(e)) from None


def load(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None) -> Config:
    """Defaults <- `base` (e.g. a checkpoint's config) <- YAML file <- dotted overrides."""
    tree: dict = dict(base or {})
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        loaded, lines = _read_yaml(path, "--config")
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
        for key, value in loaded.items():  # checked here: an override such as run.name=x would replace it
            if key in Config.model_fields and not isinstance(value, dict):
                where = f"line {lines[key]}: " if key in lines else ""  # not there: it came from a merge key (<<)
                raise ConfigError(f"--config {path}: {where}{key}: expected a mapping of keys (a section), "
                                  f"got {value!r}")
        tree = _merge(tree, loaded)
    tree = _merge(tree, parse_overrides(overrides or []))
    return from_dict(tree)


def to_dict(cfg: Config) -> dict:
    """Plain builtins (lists, not tuples) for YAML and for `torch.load(weights_only=True)`."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_cli(parser) -> None:
    parser.add_argument("--config", help="YAML config file (only what differs from the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides, e.g. optim.base_lr=0.2")
