"""Model zoo: build(arch, ...) with every norm layer created by imnet.norm.make.

norm_channels, norm_maps and pooled_norms read the real model (built, or run once on the meta device);
imnet.arch computes the same tables by arithmetic for config validation and check_batch_stats, and
tests/test_models.py checks that the two agree."""

from __future__ import annotations

import functools

import torch
from torch import nn

from imnet import config
from imnet import norm as norms
from imnet.arch import ARCHS, check_batch_stats
from imnet.models.resnet import norm_shapes, resnet
from imnet.models.small import CifarResNet, SmallNet


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
    # One forward pass on the meta device (shapes only, no compute): every norm's
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
