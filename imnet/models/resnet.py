"""ResNet-18/50 (torchvision's, with a pluggable norm) and the init shared by every ResNet here."""

from __future__ import annotations

from typing import Callable

from torch import nn
from torchvision.models import resnet as tv

from imnet import norm as norms

NormLayer = Callable[[int], nn.Module]


def kaiming_init(conv: nn.Conv2d) -> None:
    """He init with fan_out, as torchvision (and He et al. 2015) do for ResNets."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_norms(model: nn.Module, zero_init_last: bool) -> None:
    """Every norm starts at weight 1, bias 0; with zero_init_last the last norm of each residual
    block starts at weight 0 so the block is the identity (its shortcut) at init (Goyal et al.
    2017, the GN paper's recipe).

    Done here rather than by torchvision's zero_init_residual: torchvision only resets
    BatchNorm2d / GroupNorm instances and assumes the last norm has a `.weight`, which the
    Identity of norm="none" lacks (that block is then left as is).
    """
    for m in model.modules():
        if norms.is_norm(m) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if not zero_init_last:
        return
    for m in model.modules():
        last = last_norm(m)
        if last is not None and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)


def last_norm(block: nn.Module) -> nn.Module | None:
    """The norm whose output is added to the shortcut, or None if `block` is no residual block."""
    if isinstance(block, tv.Bottleneck):
        return block.bn3
    if isinstance(block, tv.BasicBlock):
        return block.bn2
    return None


def resnet(depth: int, *, num_classes: int, in_channels: int, image_size: int,
           norm_layer: NormLayer, zero_init_last: bool) -> nn.Module:
    """torchvision ResNet-18 or -50; convs stay bias-free whatever the norm (torchvision's choice)."""
    factories = {18: tv.resnet18, 50: tv.resnet50}
    model = factories[depth](weights=None, num_classes=num_classes, norm_layer=norm_layer)
    if image_size <= 64:
        # CIFAR-style stem: the ImageNet stem (stride-2 7x7 conv + max-pool) would shrink a 32x32
        # image to 8x8 before layer1 and 1x1 by layer4.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        kaiming_init(model.conv1)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        kaiming_init(model.conv1)
    init_norms(model, zero_init_last)
    return model
