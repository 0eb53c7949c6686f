"""imnet.models: every arch x norm builds and trains a step; zero-init; norm_channels; norm types."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from imnet import arch as arch_table
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


# image sizes around each stem switch (64/65 px), the small net's limit (16 px), odd and tiny ones
TABLE_SIZES = (1, 2, 4, 5, 8, 9, 15, 16, 17, 28, 32, 33, 63, 64, 65, 66, 96, 224, 225)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_the_arithmetic_tables_are_the_real_models(arch):
    """imnet.arch (config validation, check_batch_stats) agrees with the built model and its meta pass."""
    assert arch_table.ARCHS == models.ARCHS
    assert arch_table.norm_channels(arch) == models.norm_channels(arch, 224) == models.norm_channels(arch, 32)
    for size in TABLE_SIZES:
        try:
            want = models.norm_maps(arch, size), models.pooled_norms(arch, size)
        except ValueError as e:
            for table in (arch_table.norm_maps, arch_table.pooled_norms):
                with pytest.raises(ValueError) as got:
                    table(arch, size)
                assert str(got.value) == str(e)
            continue
        assert (arch_table.norm_maps(arch, size), arch_table.pooled_norms(arch, size)) == want, size


def test_the_resnet50_shape_counts_are_the_real_models():
    """What precompile and the kernel benchmarks take (arch.norm_shapes), against the norm inputs of
    the real ResNet-50 on the meta device."""
    from collections import Counter

    for size in (32, 224):
        want = Counter(m[1:] for m in models.norm_maps("resnet50", size))
        assert arch_table.norm_shapes("resnet50", size) == dict(sorted(want.items()))
        assert sum(want.values()) == 53


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



# --- 1 image per rank: where BatchNorm's statistics of one image can train ----------------------

def _ways(norm_name, *extra):
    ways = (["model.norm=gn (or syncbn on 2+ ranks)"] if norm_name == "bn" else ["model.norm=gn", "syncbn on 2+ ranks"])
    ways += ["data.batch_size >= 2", *extra]
    return ways[0] + " or " + ways[1] if len(ways) == 2 else ", ".join(ways[:-1]) + ", or " + ways[-1]


def _setup(norm_name):
    return "model.norm=bn" if norm_name == "bn" else "model.norm=syncbn on 1 rank"


def _one_by_one(layer, more, size, fix, norm_name="bn"):
    see = "sees" if not more else f"and {more} later norm layers see"
    return (f"data.batch_size: 1 image per rank with {_setup(norm_name)}: layer {layer} {see} a 1x1 map at "
            f"{size}x{size} px input, one value per channel, which BatchNorm cannot train on; use "
            f"{_ways(norm_name, f'data.image_size >= {fix}')}")


def _before_pool(layer, norm_name="bn"):
    return (f"data.batch_size: 1 image per rank with {_setup(norm_name)}: layer {layer} feeds the global average "
            f"pool, which then returns its beta whatever the image (one image's map normalized over H x W "
            f"averages to 0), so no layer before it can learn; use {_ways(norm_name)}")


def test_norm_maps_and_the_norm_before_the_pool():
    assert models.norm_maps("small", 28) == [("features.2", 64, 14, 14), ("features.5", 128, 7, 7),
                                             ("features.8", 256, 3, 3), ("features.11", 512, 1, 1)]
    assert [m[2:] for m in models.norm_maps("small", 32)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    maps = models.norm_maps("resnet50", 224)
    assert len(maps) == 53 and maps[0] == ("bn1", 64, 112, 112) and maps[-1] == ("layer4.2.bn3", 2048, 7, 7)
    assert models.pooled_norms("small", 32) == {"features.11"}
    for arch in RESNETS:  # the last norm's output is added to the shortcut in place: not the pool's input
        assert models.pooled_norms(arch, 32) == set()
    with pytest.raises(ValueError, match=r"^data\.image_size: 15 px is too small for model\.arch=small \("):
        models.norm_maps("small", 15)


def _grads_after_one_image(model, size, in_channels=3):
    torch.manual_seed(1)
    loss = nn.functional.cross_entropy(model.train()(torch.randn(1, in_channels, size, size)), torch.tensor([3]))
    loss.backward()
    return {n: p.grad.abs().max().item() for n, p in model.named_parameters()}


def test_small_net_bn_at_one_image_learns_nothing_so_it_is_refused():
    """The small net's last BN sits straight before the pool: with one image its pooled output is
    beta exactly, so every conv (and that norm's gamma) gets no gradient but float rounding, at any
    image size, although each norm sees 4+ values per channel at 32 px and the step runs."""
    torch.manual_seed(0)
    bn = _grads_after_one_image(models.build("small", num_classes=10, image_size=32, norm="bn"), 32)
    assert max(g for n, g in bn.items() if n.startswith("features.") and n != "features.11.bias") < 1e-6
    assert bn["features.11.bias"] > 1e-3 and bn["head.5.weight"] > 1e-3  # beta and the head: the label prior
    torch.manual_seed(0)
    gn = _grads_after_one_image(models.build("small", num_classes=10, image_size=32, norm="gn"), 32)
    assert min(gn.values()) > 1e-5  # negative control: GN's pooled features depend on the image
    for size in (28, 32, 64):
        with pytest.raises(ValueError) as e:
            models.check_batch_stats("small", "bn", size, 1)
        assert str(e.value) == _before_pool("features.11 (BatchNorm2d(512))")
    models.check_batch_stats("small", "bn", 28, 2)


# (arch, image size, the refusal's first 1x1 layer, how many later, the smallest size that trains);
# layer None: every norm sees 2+ values per channel at 1 image.
ONE_IMAGE = [
    ("resnet20", 4, "layer3.0.bn1 (BatchNorm2d(64))", 6, 5),
    ("resnet20", 5, None, 0, 0),
    ("resnet56", 4, "layer3.0.bn1 (BatchNorm2d(64))", 18, 5),
    ("resnet18", 8, "layer4.0.bn1 (BatchNorm2d(512))", 4, 9),  # CIFAR stem: 8 -> 8, 4, 2, 1
    ("resnet18", 9, None, 0, 0),
    ("resnet50", 8, "layer4.0.bn2 (BatchNorm2d(512))", 8, 9),  # bn1 (1x1 conv) still sees layer3's 2x2
]


@pytest.mark.parametrize("arch, size, layer, more, fix", ONE_IMAGE)
def test_resnets_at_one_image_refused_exactly_where_batchnorm_cannot_train(arch, size, layer, more, fix):
    """The check agrees with torch: a real BN model in train mode on 1 image fails exactly where the
    check refuses, and where it passes a training step gives every parameter a gradient."""
    torch.manual_seed(0)
    model = models.build(arch, num_classes=10, image_size=size, norm="bn", zero_init_last=False)
    if layer is None:
        models.check_batch_stats(arch, "bn", size, 1)
        assert min(_grads_after_one_image(model, size).values()) > 0
        return
    with pytest.raises(ValueError) as e:
        models.check_batch_stats(arch, "bn", size, 1)
    assert str(e.value) == _one_by_one(layer, more, size, fix)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model.train()(torch.randn(1, 3, size, size))  # what the check saves the user from, at the first step
    models.check_batch_stats(arch, "bn", size, 2)  # 2 images: 2 values per channel
    models.check_batch_stats(arch, "bn", fix, 1)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 10)  # eval: running statistics


def test_resnet20_trains_on_one_cifar_image_per_rank():
    torch.manual_seed(0)
    model = models.build("resnet20", num_classes=10, image_size=32, norm="bn")
    models.check_batch_stats("resnet20", "bn", 32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    grads = _grads_after_one_image(model, 32)
    opt.step()
    # zero_init_last: each block's last gamma starts at 0, so the branch before it waits for it to move
    waiting = {f"layer{i}.{j}.{p}" for i in (1, 2, 3) for j in range(3)
               for p in ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight")}
    assert {n for n, g in grads.items() if g == 0} == waiting
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = {n for (n, p), b in zip(model.named_parameters(), before) if not torch.equal(p, b)}
    assert moved == set(grads) - waiting


def test_syncbn_is_judged_only_where_the_world_is_known():
    with pytest.raises(ValueError) as e:
        models.check_batch_stats("resnet18", "syncbn", 8, 1, world=1)
    assert str(e.value) == _one_by_one("layer4.0.bn1 (SyncBatchNorm2d(512))", 4, 8, 9, "syncbn")
    with pytest.raises(ValueError) as e:
        models.check_batch_stats("small", "syncbn", 32, 1, world=1)
    assert str(e.value) == _before_pool("features.11 (SyncBatchNorm2d(512))", "syncbn")
    models.check_batch_stats("small", "syncbn", 28, 1, world=2)  # statistics over 2 images
    models.check_batch_stats("resnet18", "syncbn", 8, 1, world=2)
    models.check_batch_stats("small", "syncbn", 28, 1)  # world unknown (config time): not judged
    with pytest.raises(ValueError, match="with model.norm=bn:"):
        models.check_batch_stats("resnet18", "bn", 8, 1, world=8)  # bn's statistics stay per rank


@pytest.mark.parametrize("norm_name", ["gn", "ln", "in", "none"])
def test_other_norms_are_not_checked(norm_name):
    models.check_batch_stats("small", norm_name, 28, 1, world=1)
    models.check_batch_stats("resnet18", norm_name, 2, 1, world=1)


def test_gn_trains_one_image_with_a_1x1_map():
    torch.manual_seed(0)
    model = models.build("small", num_classes=10, in_channels=1, image_size=28, norm="gn")
    assert models.norm_maps("small", 28)[-1][2:] == (1, 1)
    assert min(_grads_after_one_image(model, 28, in_channels=1).values()) > 0


def test_from_config_checks_what_config_time_cannot_know():
    from imnet import config
    from imnet.data.datasets import DatasetInfo

    # an h5 file of 8 px images (config validation cannot read it), and syncbn's world
    info = DatasetInfo(10, 1, 8, (0.5,), (0.25,))
    for norm_name, world in (("bn", 2), ("syncbn", 1)):
        mcfg = config.load(None, ["model.arch=resnet18", f"model.norm={norm_name}", "data.name=h5",
                                  "data.batch_size=1"]).model
        with pytest.raises(config.ConfigError) as e:
            models.from_config(mcfg, info, batch_size=1, world=world)
        cls = "BatchNorm2d" if norm_name == "bn" else "SyncBatchNorm2d"
        assert str(e.value) == _one_by_one(f"layer4.0.bn1 ({cls}(512))", 4, 8, 9, norm_name)
        assert isinstance(models.from_config(mcfg, info), nn.Module)  # evaluation: no batch, no check
        assert isinstance(models.from_config(mcfg, info, batch_size=2, world=world), nn.Module)
    model = models.from_config(mcfg, info, batch_size=1, world=2)  # syncbn on 2 ranks
    assert isinstance(model.layer4[0].bn1, SyncBatchNorm2d)
