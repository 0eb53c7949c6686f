"""Each arch's norm layers by arithmetic: module path, channels and map size, without torch or a model.

Config validation checks GN groups and BatchNorm at one image per rank with this module, so validating
a YAML imports neither torch nor imnet.models. It sits at imnet's top level, not in imnet/models/,
because importing any module of that package first runs the package's __init__ (torch, torchvision,
the kernels). tests/test_models.py checks every table against a forward pass of the real model on the
meta device (models.norm_maps).
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Literal, get_args

Arch = Literal["small", "resnet18", "resnet50", "resnet20", "resnet56"]
ARCHS: tuple[str, ...] = get_args(Arch)

Map = tuple[str, int, int, int]  # (module path, C, H, W) of a norm layer's input, for one image


def num_groups(channels: int, groups: int | None = 32, channels_per_group: int | None = None) -> int:
    """Number of GroupNorm groups for `channels`; channels_per_group, when given, wins over groups."""
    if channels_per_group is not None:
        if channels_per_group <= 0 or channels % channels_per_group:
            raise ValueError(
                f"GroupNorm: {channels} channels cannot be split into groups of "
                f"{channels_per_group} channels (channels_per_group must divide channels)"
            )
        return channels // channels_per_group
    if groups is None:
        raise ValueError("GroupNorm needs groups or channels_per_group (both are None)")
    if groups <= 0 or channels % groups:
        raise ValueError(
            f"GroupNorm: {channels} channels cannot be split into {groups} groups "
            f"(groups must divide channels)"
        )
    return groups


class _Walk:
    """Follows one image's side (px) through convs and pools, collecting the norms' input maps."""

    def __init__(self, arch: str, image_size: int) -> None:
        self.arch, self.image_size, self.maps = arch, image_size, []

    def out(self, h: int, kernel: int, stride: int, padding: int) -> int:
        """The side after a conv or max-pool (floor mode), as torch computes it."""
        if h + 2 * padding < kernel:  # torch's own words, so the message reads as a real forward pass's
            raise ValueError(f"data.image_size: {self.image_size} px is too small for model.arch={self.arch} "
                             f"(Calculated padded input size per channel: ({h + 2 * padding} x {h + 2 * padding}). "
                             f"Kernel size: ({kernel} x {kernel}). Kernel size can't be greater than actual "
                             f"input size)")
        return (h + 2 * padding - kernel) // stride + 1

    def norm(self, name: str, channels: int, h: int) -> None:
        self.maps.append((name, channels, h, h))


def _small(w: _Walk) -> set[str]:
    """models.small.SmallNet: 4 x (conv 4x4 stride 2 padding 1 -> ReLU -> norm); the last norm feeds the pool."""
    h = w.image_size
    for i, width in enumerate((64, 128, 256, 512)):
        h = w.out(h, 4, 2, 1)
        w.norm(f"features.{3 * i + 2}", width, h)
    return {"features.11"}


def _torchvision_resnet(w: _Walk, depth: int) -> set[str]:
    """models.resnet.resnet: torchvision's ResNet-18/50, with the CIFAR stem at <= 64 px."""
    bottleneck, blocks = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
    expansion = 4 if bottleneck else 1
    if w.image_size <= 64:  # 3x3 stride-1 conv, no max-pool
        h = w.out(w.image_size, 3, 1, 1)
        w.norm("bn1", 64, h)
    else:  # 7x7 stride-2 conv, 3x3 stride-2 max-pool
        h = w.out(w.image_size, 7, 2, 3)
        w.norm("bn1", 64, h)
        h = w.out(h, 3, 2, 1)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        for j in range(n):
            stride, name, h_in = (2 if i > 0 and j == 0 else 1), f"layer{i + 1}.{j}", h
            if bottleneck:  # 1x1, 3x3 (the stride), 1x1 to planes x 4
                w.norm(f"{name}.bn1", planes, h_in)
                h = w.out(h_in, 3, stride, 1)
                w.norm(f"{name}.bn2", planes, h)
                w.norm(f"{name}.bn3", planes * expansion, h)
            else:  # 3x3 (the stride), 3x3
                h = w.out(h_in, 3, stride, 1)
                w.norm(f"{name}.bn1", planes, h)
                w.norm(f"{name}.bn2", planes, h)
            if stride != 1 or inplanes != planes * expansion:  # the projection shortcut runs after the branch
                w.norm(f"{name}.downsample.1", planes * expansion, w.out(h_in, 1, stride, 0))
            inplanes = planes * expansion
    return set()  # the add and a ReLU come between the last norm and the pool


def _cifar_resnet(w: _Walk, depth: int) -> set[str]:
    """models.small.CifarResNet: ResNet-(6n+2), stages of 16/32/64 channels."""
    h = w.out(w.image_size, 3, 1, 1)
    w.norm("bn1", 16, h)
    c = 16
    for i, width in enumerate((16, 32, 64)):
        for j in range((depth - 2) // 6):
            stride, name, h_in = (2 if i > 0 and j == 0 else 1), f"layer{i + 1}.{j}", h
            h = w.out(h_in, 3, stride, 1)
            w.norm(f"{name}.bn1", width, h)
            w.norm(f"{name}.bn2", width, h)
            if stride != 1 or c != width:
                w.norm(f"{name}.downsample.1", width, w.out(h_in, 1, stride, 0))
            c = width
    return set()


def _table(arch: str, image_size: int) -> tuple[list[Map], set[str]]:
    w = _Walk(arch, image_size)
    if arch == "small":
        pooled = _small(w)
    elif arch in ("resnet18", "resnet50"):
        pooled = _torchvision_resnet(w, int(arch[6:]))
    elif arch in ("resnet20", "resnet56"):
        pooled = _cifar_resnet(w, int(arch[6:]))
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return w.maps, pooled


def norm_maps(arch: str, image_size: int) -> list[Map]:
    """(module path, C, H, W) of the input of every norm layer of `arch` for one image of
    image_size x image_size px, in call order. A ValueError names data.image_size when the image is
    too small for the arch (e.g. "small" below 16 px)."""
    return _table(arch, image_size)[0]


def pooled_norms(arch: str, image_size: int) -> set[str]:
    """Module paths of the norm layers whose output goes straight into the global average pool
    (the small net's last norm; none in the ResNets, where the add and a ReLU come between)."""
    return _table(arch, image_size)[1]


def norm_shapes(arch: str, image_size: int = 224) -> dict[tuple[int, int, int], int]:
    """The distinct (C, H, W) norm inputs of `arch`, sorted, each with how many layers have it (the
    kernel tools precompile and benchmark these shapes)."""
    return dict(sorted(Counter(m[1:] for m in norm_maps(arch, image_size)).items()))


def norm_channels(arch: str) -> set[int]:
    """Every channel count a norm layer of `arch` sees (e.g. to check that GN groups divide them)."""
    return {c for _, c, _, _ in norm_maps(arch, 224)}  # widths do not depend on the image size; 224 px fits all


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
    maps, pooled = _table(arch, image_size)
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
