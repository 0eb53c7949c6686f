"""imnet.models: every arch x norm builds and trains a step; zero-init; norm_channels; norm types."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from imnet import models, norm
from imnet.models.resnet import last_norm
from imnet.norm import SyncBatchNorm2d


# gn with 8 groups divides every width of every arch (16 ... 2048); syncbn is BN without a group.
NORMS = {"bn": {}, "syncbn": {}, "gn": {"groups": 8}, "ln": {}, "in": {}, "none": {}}
RESNETS = ("resnet18", "resnet50", "resnet20", "resnet56")


def _build(arch, norm_name="bn", in_channels=3, num_classes=7, **kw):
    return models.build(arch, num_classes=num_classes, in_channels=in_channels, image_size=32,
                        norm=norm_name, norm_kwargs=NORMS[norm_name], **kw)


def _meta_build(arch, norm_name):
    # structure-only tests: no memory, no init cost
    with torch.device("meta"):
        return _build(arch, norm_name)


def _norms(model):
    return [m for m in model.modules() if norm.is_norm(m)]


# Every norm on the cheap archs; two each on the costly ones (the norm layers themselves are
# covered by test_norm.py; here it is the wiring). Types for every arch x norm: further below.
TRAIN_CASES = [(a, n) for a in ("small", "resnet20") for n in NORMS] + [
    ("resnet18", "bn"), ("resnet18", "in"), ("resnet50", "gn"), ("resnet50", "none"),
    ("resnet56", "syncbn"), ("resnet56", "ln")]


@pytest.mark.parametrize("arch, norm_name", TRAIN_CASES)
def test_forward_backward_channels_last(arch, norm_name):
    torch.manual_seed(0)
    model = _build(arch, norm_name, in_channels=1)
    x = torch.randn(2, 1, 16, 16)  # 16x16 keeps 30 train steps fast; 28/32 are covered below
    y = model(x)
    assert y.shape == (2, 7)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    # channels_last: same numbers (the conv algorithms differ, hence a tolerance)
    model_cl = model.to(memory_format=torch.channels_last)
    y_cl = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("in_channels, size", [(1, 28), (3, 32)])
def test_input_channels_and_sizes(arch, in_channels, size):
    model = _build(arch, "gn", in_channels=in_channels, num_classes=10)
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, size, size)).shape == (2, 10)


@pytest.mark.parametrize("size", [64, 224])
def test_small_net_larger_inputs(size):
    with torch.no_grad():
        assert _build("small", "bn")(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_resnet50_imagenet_size():
    model = models.build("resnet50", num_classes=1000, in_channels=1, norm="gn")
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 224, 224)).shape == (1, 1000)


def test_cifar_stem_for_small_images():
    for size in (32, 64):
        m = models.build("resnet18", num_classes=10, image_size=size)
        assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
        assert isinstance(m.maxpool, nn.Identity)
    m = models.build("resnet18", num_classes=10, image_size=96)
    assert m.conv1.kernel_size == (7, 7) and isinstance(m.maxpool, nn.MaxPool2d)


def test_cifar_resnet_structure():
    for arch, n in (("resnet20", 3), ("resnet56", 9)):
        m = _build(arch)
        stages = (m.layer1, m.layer2, m.layer3)
        assert [len(s) for s in stages] == [n] * 3
        assert [s[0].conv2.out_channels for s in stages] == [16, 32, 64]
        assert m.layer1[0].downsample is None
        for s in (m.layer2, m.layer3):
            conv, bn = s[0].downsample
            assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
        convs = sum(isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3) for x in m.modules())
        assert convs + 1 == int(arch[6:])  # 3x3 convs + the fc layer = the depth


@pytest.mark.parametrize("arch", RESNETS)
@pytest.mark.parametrize("norm_name", ["bn", "syncbn", "gn"])  # ln / in are GroupNorm like gn
def test_zero_init_last_norm_of_each_block(arch, norm_name):
    model = _build(arch, norm_name)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == {"resnet18": 8, "resnet50": 16, "resnet20": 9, "resnet56": 27}[arch]
    last = {id(last_norm(b)) for b in blocks}
    for m in _norms(model):
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert torch.equal(m.weight, torch.zeros_like(m.weight) if id(m) in last else torch.ones_like(m.weight))
    for m in _norms(_build(arch, norm_name, zero_init_last=False)):
        assert torch.equal(m.weight, torch.ones_like(m.weight))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_block_is_its_shortcut_at_init(arch):
    torch.manual_seed(0)
    model = _build(arch, "gn")
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    projection = next(b for b in blocks if b.downsample is not None)
    for block in (blocks[0], projection, blocks[-1]):
        c = block.conv1.in_channels
        x = torch.randn(2, c, 8, 8)
        shortcut = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(block(x), torch.relu(shortcut))


def test_none_norm_builds_without_norm_modules():
    for arch in models.ARCHS:
        model = _meta_build(arch, "none")
        assert not _norms(model)
        assert any(isinstance(m, nn.Identity) for m in model.modules())


def test_norm_channels():
    assert models.norm_channels("resnet50") == {64, 128, 256, 512, 1024, 2048}
    assert models.norm_channels("resnet18") == {64, 128, 256, 512}
    assert models.norm_channels("resnet20") == {16, 32, 64}
    assert models.norm_channels("resnet56", image_size=32) == {16, 32, 64}
    assert models.norm_channels("small") == {64, 128, 256, 512}
    # agrees with what a real build creates
    for arch in models.ARCHS:
        widths = {m.num_channels for m in _norms(_meta_build(arch, "gn"))}
        assert widths == models.norm_channels(arch, 32)


def test_gn_groups_must_divide_every_width():
    with pytest.raises(ValueError, match="16 channels.*32 groups"):
        models.build("resnet20", num_classes=10, norm="gn", norm_kwargs={"groups": 32})
    models.build("resnet20", num_classes=10, norm="gn", norm_kwargs={"channels_per_group": 16})


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'vgg'.*resnet50"):
        models.build("vgg", num_classes=10)


@pytest.mark.parametrize("arch", models.ARCHS)
@pytest.mark.parametrize("norm_name", list(NORMS))
def test_every_norm_module_has_the_expected_type(arch, norm_name):
    model = _meta_build(arch, norm_name)
    found = _norms(model)
    assert bool(found) == (norm_name != "none")
    # nothing built outside the registry: no stray BatchNorm / GroupNorm of another kind
    for m in found:
        if norm_name == "bn":
            assert type(m) is nn.BatchNorm2d
        elif norm_name == "syncbn":
            assert type(m) is SyncBatchNorm2d
        else:
            assert type(m) is nn.GroupNorm
            expected = {"gn": 8, "ln": 1, "in": m.num_channels}[norm_name]
            assert m.num_groups == expected
    n_norms = {"small": 4, "resnet18": 20, "resnet50": 53, "resnet20": 21, "resnet56": 57}[arch]
    assert len(found) in (0, n_norms)


def test_conv_bias_policy():
    # ResNets: bias-free convs (torchvision's choice, kept for every norm); small: the conv feeds a
    # ReLU before the norm, so its bias is not redundant and stays.
    for arch in RESNETS:
        for norm_name in ("bn", "none"):
            model = _meta_build(arch, norm_name)
            assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in _build("small").modules() if isinstance(m, nn.Conv2d))


def test_small_net_order_is_conv_relu_norm():
    feats = _build("small", "gn").features
    kinds = [type(m) for m in feats]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.GroupNorm] * 4
    assert [m.out_channels for m in feats if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) and m.padding == (1, 1)
               for m in feats if isinstance(m, nn.Conv2d))
    head = [m for m in _build("small").head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(512, 128), (128, 32), (32, 7)]
