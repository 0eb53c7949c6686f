"""ResNet-18/50 (torchvision's, with a pluggable norm) and the init shared by every ResNet here."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet as tv

from imnet import norm as norms
from imnet.kernels import Act, ChannelsLastGroupNorm

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


class BasicBlock(tv.BasicBlock):
    """torchvision's BasicBlock (same modules, same state-dict keys). Once fuse_norm_act() sets
    `fused`, bn1 applies the ReLU itself and bn2 computes relu(bn2(x) + identity) in one kernel
    (or only the norm, the add and ReLU then separate, if bn2.act is Act.NONE)."""

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.bn1(self.conv1(x)))  # bn1: GroupNorm + ReLU
        if self.bn2.act == Act.RELU:
            return self.bn2(out, identity)  # relu(GroupNorm(out) + identity)
        return self.relu(self.bn2(out) + identity)


class Bottleneck(tv.Bottleneck):
    """torchvision's Bottleneck (same modules, same state-dict keys). Once fuse_norm_act() sets
    `fused`, bn1 and bn2 apply the ReLU themselves and bn3 computes relu(bn3(x) + identity) in one
    kernel (or only the norm, the add and ReLU then separate, if bn3.act is Act.NONE)."""

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))  # bn1, bn2: GroupNorm + ReLU
        out = self.conv3(out)
        if self.bn3.act == Act.RELU:
            return self.bn3(out, identity)  # relu(GroupNorm(out) + identity)
        return self.relu(self.bn3(out) + identity)


def fuse_norm_act(model: nn.Module, residual: bool = True) -> nn.Module:
    """Let norms that can fuse (ChannelsLastGroupNorm) apply the ReLU that follows them: the stem's
    and each block's norm -> ReLU pairs, and with `residual` the block's last norm + add + ReLU.
    Modules and state dict are unchanged (only `act` attributes, and the stem's parameter-free ReLU
    becomes an Identity); other norms (BN, native GN) are left exactly as they are. Returns model.
    """
    if (not isinstance(model, (BasicBlock, Bottleneck)) and isinstance(getattr(model, "relu", None), nn.ReLU)
            and isinstance(getattr(model, "bn1", None), ChannelsLastGroupNorm)):
        model.bn1.act = Act.RELU  # the stem: conv1 -> bn1 -> relu (the model's `relu` is used nowhere else)
        model.relu = nn.Identity()
    for block in model.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            *inner, last = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
            if all(isinstance(m, ChannelsLastGroupNorm) for m in (*inner, last)):
                for m in inner:
                    m.act = Act.RELU
                last.act = Act.RELU if residual else Act.NONE
                block.fused = True
    return model


def norm_shapes(model: nn.Module, image_size: int, in_channels: int = 3) -> list[tuple[str, int, int, int]]:
    """(name, C, H, W) of the input of every norm layer, in call order, for one image. Run the model
    on the meta device (built under `with torch.device("meta")`) to get them without compute.
    The pass runs in eval mode: in train mode BatchNorm refuses the 1x1 maps this is used to find."""
    shapes: list[tuple[str, int, int, int]] = []
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: shapes.append((name, *args[0].shape[1:])))
             for name, m in model.named_modules() if norms.is_norm(m)]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def resnet(depth: int, *, num_classes: int, in_channels: int, image_size: int,
           norm_layer: NormLayer, zero_init_last: bool) -> nn.Module:
    """torchvision ResNet-18 or -50; convs stay bias-free whatever the norm (torchvision's choice).

    Built from the subclassed blocks above (what tv.resnet18 / tv.resnet50 build, with the same
    initialization), so that a fusing GroupNorm runs norm + ReLU (and add + ReLU) as one kernel.
    """
    blocks = {18: (BasicBlock, [2, 2, 2, 2]), 50: (Bottleneck, [3, 4, 6, 3])}
    block, layers = blocks[depth]
    model = tv.ResNet(block, layers, num_classes=num_classes, norm_layer=norm_layer)
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
    return fuse_norm_act(model)
