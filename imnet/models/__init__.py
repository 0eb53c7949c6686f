"""Model zoo: build(arch, ...) with every norm layer created by imnet.norm.make."""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from imnet import config
from imnet import norm as norms
from imnet.models.resnet import norm_shapes, resnet
from imnet.models.small import CifarResNet, SmallNet

ARCHS = ("small", "resnet18", "resnet50", "resnet20", "resnet56")


def build(arch: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224,
          norm: str = "bn", norm_kwargs: dict | None = None, zero_init_last: bool = True) -> nn.Module:
    """A freshly initialized model; norm layers are norms.make(norm, channels, **norm_kwargs).

    image_size only picks the ResNet-18/50 stem (<= 64: CIFAR-style 3x3 stride-1, no max-pool).
    zero_init_last: start the last norm of each residual block at gamma = 0 (no effect on "small").
    """
    norm_layer = functools.partial(norms.make, norm, **(norm_kwargs or {}))
    if arch in ("resnet18", "resnet50"):
        return resnet(int(arch[6:]), num_classes=num_classes, in_channels=in_channels,
                      image_size=image_size, norm_layer=norm_layer, zero_init_last=zero_init_last)
    if arch in ("resnet20", "resnet56"):
        return CifarResNet(int(arch[6:]), num_classes, in_channels, norm_layer, zero_init_last)
    if arch == "small":
        return SmallNet(num_classes, in_channels, norm_layer)
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


@functools.lru_cache(maxsize=None)
def _norm_channels(arch: str, image_size: int) -> frozenset[int]:
    # Build with plain BN on the meta device (no memory, no init cost) and read the widths.
    with torch.device("meta"):
        model = build(arch, num_classes=10, image_size=image_size, norm="bn")
    return frozenset(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def norm_channels(arch: str, image_size: int = 224) -> set[int]:
    """Every channel count a norm layer of `arch` sees (e.g. to check that GN groups divide them)."""
    return set(_norm_channels(arch, image_size))


@functools.cache
def _meta_pass(arch: str, image_size: int) -> tuple[tuple[tuple[str, int, int, int], ...], frozenset[str]]:
    # One forward pass on the meta device (shapes only; about 70 ms for ResNet-50 at 224): every norm's
    # input shape, and the norms whose output is the global average pool's input itself. in_channels
    # stays 3: it changes conv1's weights, never the size of a map.
    with torch.device("meta"):
        model = build(arch, num_classes=10, image_size=image_size, norm="bn")
    outs: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (output, its version: in-place ops bump it)
    pooled: set[str] = set()

    def into_pool(_, args) -> None:  # the very tensor a norm returned, not modified since (ResNets add in place)
        pooled.update(n for n, (o, v) in outs.items() if o is args[0] and o._version == v)

    hooks = [m.register_forward_hook(lambda _, __, out, name=name: outs.__setitem__(name, (out, out._version)))
             for name, m in model.named_modules() if norms.is_norm(m)]
    hooks += [m.register_forward_pre_hook(into_pool) for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        maps = norm_shapes(model, image_size)
    finally:
        for h in hooks:
            h.remove()
    return tuple(maps), frozenset(pooled)


def _meta(arch: str, image_size: int) -> tuple[tuple[tuple[str, int, int, int], ...], frozenset[str]]:
    try:
        return _meta_pass(arch, image_size)
    except RuntimeError as e:  # a conv or pool whose input got smaller than its kernel
        raise ValueError(f"data.image_size: {image_size} px is too small for model.arch={arch} ({e})") from None


def norm_maps(arch: str, image_size: int) -> list[tuple[str, int, int, int]]:
    """(module path, C, H, W) of the input of every norm layer of `arch` for one image of
    image_size x image_size px, in call order. A ValueError names data.image_size when the image is
    too small for the arch (e.g. "small" below 16 px)."""
    return list(_meta(arch, image_size)[0])


def pooled_norms(arch: str, image_size: int) -> set[str]:
    """Module paths of the norm layers whose output goes straight into the global average pool
    (the small net's last norm; none in the ResNets, where the add and a ReLU come between)."""
    return set(_meta(arch, image_size)[1])


def _either(ways: list[str]) -> str:
    return ways[0] if len(ways) == 1 else f"{', '.join(ways[:-1])}{',' if len(ways) > 2 else ''} or {ways[-1]}"


def check_batch_stats(arch: str, norm: str, image_size: int, batch_size: int, world: int | None = None) -> None:
    """Refuse (ValueError naming the layer and the ways out) a BatchNorm whose statistics come from
    one image (1 image per rank with bn, or with syncbn on 1 rank) where that cannot train:

    - a norm layer straight before the global average pool: normalized over the very H x W values
      the pool averages, its pooled output is its beta whatever the image, so the head sees the
      same features for every image and no layer before it gets a gradient (at any image size);
    - a norm layer whose input map is 1x1: one value per channel, which torch's BatchNorm refuses
      at the first training step.

    bn's statistics are per rank; syncbn's span the ranks (batch_size x world images), so syncbn is
    judged only where `world` is known (None, at config time: it passes). Other maps train at 1
    image (BN then normalizes each image on its own over H x W, much as IN does); eval mode, gn,
    ln, in and none are not affected.
    """
    if norm not in ("bn", "syncbn") or batch_size > 1 or (norm == "syncbn" and (world is None or world > 1)):
        return
    maps, pooled = _meta(arch, image_size)
    cls = "BatchNorm2d" if norm == "bn" else "SyncBatchNorm2d"
    setup, ways = (("model.norm=bn", ["model.norm=gn (or syncbn on 2+ ranks)"]) if norm == "bn" else
                   ("model.norm=syncbn on 1 rank", ["model.norm=gn", "syncbn on 2+ ranks"]))
    ways.append("data.batch_size >= 2")
    head = f"data.batch_size: 1 image per rank with {setup}: layer"
    for name, c, _, _ in maps:
        if name in pooled:
            raise ValueError(f"{head} {name} ({cls}({c})) feeds the global average pool, which then returns "
                             f"its beta whatever the image (one image's map normalized over H x W averages "
                             f"to 0), so no layer before it can learn; use {_either(ways)}")
    ones = [(name, c) for name, c, h, w in maps if h * w == 1]
    if not ones:
        return
    name, c = ones[0]
    see = "sees" if len(ones) == 1 else f"and {len(ones) - 1} later norm layers see"
    size = next(s for s in itertools.count(image_size + 1)
                if all(h * w > 1 for _, _, h, w in norm_maps(arch, s)))  # the smallest size that trains
    raise ValueError(f"{head} {name} ({cls}({c})) {see} a 1x1 map at {image_size}x{image_size} px input, one "
                     f"value per channel, which BatchNorm cannot train on; use "
                     f"{_either(ways + [f'data.image_size >= {size}'])}")


def norm_kwargs(mcfg) -> dict:
    """The keyword arguments `norm.make` takes, from the config's `model` section."""
    kw = {"eps": mcfg.norm_eps}
    if mcfg.norm in ("gn", "ln", "in"):
        kw["impl"] = mcfg.gn_impl
    if mcfg.norm == "gn":
        kw.update(groups=mcfg.gn_groups, channels_per_group=mcfg.gn_channels_per_group)
    return kw


def from_config(mcfg, info, *, batch_size: int | None = None, world: int = 1) -> nn.Module:
    """The model the config's `model` section describes, for a dataset with `info` (a DatasetInfo).

    For training, pass batch_size (data.batch_size) and world (ranks): check_batch_stats then runs with
    what config validation cannot know (the image size of an h5 file, the world for syncbn) and a
    refused setup is a ConfigError with the same message, before anything trains."""
    if batch_size is not None:
        try:
            check_batch_stats(mcfg.arch, mcfg.norm, info.image_size, batch_size, world)
        except ValueError as e:
            raise config.ConfigError(str(e)) from None
    return build(mcfg.arch, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
                 norm=mcfg.norm, norm_kwargs=norm_kwargs(mcfg), zero_init_last=mcfg.zero_init_last)
