"""Small models: the seed project's conv net and the CIFAR ResNets of He et al. 2016 (sec. 4.2)."""

from __future__ import annotations

from torch import nn

from imnet.models.resnet import BasicBlock, NormLayer, fuse_norm_act, init_norms, kaiming_init


class SmallNet(nn.Module):
    """4 convs (64-128-256-512 channels, kernel 4, stride 2, padding 1), each conv -> ReLU -> norm,
    global average pool, then 512 -> 128 -> 32 -> num_classes.

    The seed's order puts the norm AFTER the ReLU, so the conv bias is not absorbed by the norm
    (it shifts the ReLU threshold): the convs keep their bias for every norm. Spatial size:
    28 -> 14 -> 7 -> 3 -> 1 and 32 -> 16 -> 8 -> 4 -> 2; any input >= 16 pixels works. The last norm
    feeds the pool directly: BN over one image would give the head its beta whatever the image, so
    models.check_batch_stats refuses bn at 1 image per rank for this net.
    """

    def __init__(self, num_classes: int, in_channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width in (64, 128, 256, 512):
            layers += [nn.Conv2d(c, width, kernel_size=4, stride=2, padding=1),
                       nn.ReLU(inplace=True), norm_layer(width)]
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, 128), nn.ReLU(inplace=True),
            nn.Linear(128, 32), nn.ReLU(inplace=True),
            nn.Linear(32, num_classes),
        )
        init_norms(self, zero_init_last=False)  # no residual blocks: all norms weight 1, bias 0

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3x3 conv (16), three stages of n BasicBlocks with 16/32/64
    channels, stride 2 entering stages 2 and 3 through a 1x1 conv + norm projection shortcut
    (the paper's option B), global average pool, linear. Blocks are torchvision's BasicBlock (the
    subclass in resnet.py that can fuse norm + ReLU), so the convs are bias-free for every norm, as
    in the torchvision ResNets.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int, norm_layer: NormLayer,
                 zero_init_last: bool) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        stages, c = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                shortcut = None
                if stride != 1 or c != width:
                    shortcut = nn.Sequential(
                        nn.Conv2d(c, width, kernel_size=1, stride=stride, bias=False),
                        norm_layer(width))
                blocks.append(BasicBlock(c, width, stride, shortcut, norm_layer=norm_layer))
                c = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_init(m)
        init_norms(self, zero_init_last)
        fuse_norm_act(self)  # only ChannelsLastGroupNorm fuses; BN, native GN: unchanged

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
