"""Model zoo: build(arch, ...) with every norm layer created by imnet.norm.make."""

from __future__ import annotations

import functools

import torch
from torch import nn

from imnet import norm as norms
from imnet.models.resnet import resnet
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


def norm_kwargs(mcfg) -> dict:
    """The keyword arguments `norm.make` takes, from the config's `model` section."""
    kw = {"eps": mcfg.norm_eps}
    if mcfg.norm in ("gn", "ln", "in"):
        kw["impl"] = mcfg.gn_impl
    if mcfg.norm == "gn":
        kw.update(groups=mcfg.gn_groups, channels_per_group=mcfg.gn_channels_per_group)
    return kw


def from_config(mcfg, info) -> nn.Module:
    """The model the config's `model` section describes, for a dataset with `info` (a DatasetInfo)."""
    return build(mcfg.arch, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
                 norm=mcfg.norm, norm_kwargs=norm_kwargs(mcfg), zero_init_last=mcfg.zero_init_last)
