"""imnet.norm: the registry, GN/LN/IN math, and SyncBatchNorm2d == BatchNorm2d on the global batch.

Tolerances: float32 throughout. Normalized statistics to 1e-5 (mean) and 1e-4 (variance, which is
var / (var + eps) and carries float32 rounding of a 512-element reduction). Equalities with torch's
own functional ops: atol 1e-5, rtol 1e-5. Multi-rank SyncBatchNorm2d vs single-process BatchNorm2d
on the concatenated batch: atol 1e-5, rtol 1e-5 for outputs, gradients and running statistics.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imnet import norm
from imnet.norm import SyncBatchNorm2d

TOL = dict(atol=1e-5, rtol=1e-5)


def _x(n=4, c=64, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-sample, per-channel offsets so statistics differ across samples and are far from 0
    return torch.randn(n, c, h, w, generator=g) * 2 + torch.randn(n, c, 1, 1, generator=g) * 3 + 5


# --- registry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", norm.NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_every_name(name, channels_last):
    m = norm.make(name, 64)
    x = _x()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert norm.is_norm(m) == (name != "none")


def test_make_types():
    assert type(norm.make("bn", 8)) is nn.BatchNorm2d
    assert type(norm.make("syncbn", 8)) is SyncBatchNorm2d
    assert isinstance(norm.make("none", 8), nn.Identity)
    for name, groups in [("gn", 4), ("ln", 1), ("in", 8)]:
        m = norm.make(name, 8, groups=4)
        assert isinstance(m, nn.GroupNorm) and m.num_groups == groups and m.affine
    bn = norm.make("bn", 8, eps=1e-3, momentum=0.01)
    assert bn.eps == 1e-3 and bn.momentum == 0.01
    assert norm.make("gn", 8, groups=2, eps=1e-3).eps == 1e-3


def test_is_norm_negative():
    for m in (nn.Identity(), nn.Conv2d(3, 3, 1), nn.Linear(2, 2), nn.ReLU()):
        assert not norm.is_norm(m)


def test_gn_zero_mean_unit_variance_per_group():
    m = norm.make("gn", 64, groups=8)  # weight 1, bias 0 at construction
    x = _x()
    y = m(x).view(4, 8, -1)  # (sample, group, 8 channels * 30 pixels)
    assert y.mean(-1).abs().max() < 1e-5
    assert (y.var(-1, unbiased=False) - 1).abs().max() < 1e-4


def test_ln_is_one_group_and_layer_norm_over_chw():
    x = _x()
    y = norm.make("ln", 64)(x)
    torch.testing.assert_close(y, F.group_norm(x, 1, eps=1e-5), **TOL)
    torch.testing.assert_close(y, F.layer_norm(x, x.shape[1:], eps=1e-5), **TOL)


def test_in_is_c_groups_and_instance_norm():
    x = _x()
    y = norm.make("in", 64)(x)
    torch.testing.assert_close(y, F.group_norm(x, 64, eps=1e-5), **TOL)
    torch.testing.assert_close(y, F.instance_norm(x, eps=1e-5), **TOL)


def test_channels_per_group():
    assert norm.num_groups(256, channels_per_group=16) == 16
    assert norm.num_groups(256, groups=8, channels_per_group=16) == 16  # channels_per_group wins
    assert norm.num_groups(256, groups=8) == 8
    assert norm.num_groups(256) == 32
    assert norm.make("gn", 256, groups=8, channels_per_group=16).num_groups == 16
    assert norm.make("gn", 64, groups=None, channels_per_group=1).num_groups == 64


@pytest.mark.parametrize("kw, numbers", [
    (dict(groups=32), ("48", "32")),
    (dict(channels_per_group=5), ("48", "5")),
    (dict(groups=None, channels_per_group=None), ()),
    (dict(groups=0), ("48", "0")),
])
def test_non_dividing_groups_raise(kw, numbers):
    with pytest.raises(ValueError) as e:
        norm.make("gn", 48, **kw)
    for s in numbers:
        assert s in str(e.value)


def test_unknown_name_and_impl():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'.*bn, syncbn, gn, ln, in, none"):
        norm.make("batchnorm", 8)
    with pytest.raises(ValueError, match="unknown norm impl 'cuda'.*native"):
        norm.make("gn", 8, groups=2, impl="cuda")
    with pytest.raises(ValueError, match="impl"):  # validated for every name: typos fail early
        norm.make("bn", 8, impl="natve")


def test_split_params_partitions_every_param_once():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), norm.make("bn", 8), norm.make("syncbn", 8), norm.make("gn", 8, groups=2),
        norm.make("ln", 8), norm.make("in", 8), norm.make("none", 8), nn.Flatten(), lin, lin,  # tied
        nn.LayerNorm(8),
    )
    normp, other = norm.split_params(model)
    ids = [id(p) for p in normp + other]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}
    expected_norm = {id(p) for i in (1, 2, 3, 4, 5, 10) for p in model[i].parameters()}
    assert {id(p) for p in normp} == expected_norm
    assert {id(p) for p in other} == {id(model[0].weight), id(model[0].bias), id(lin.weight), id(lin.bias)}


# --- SyncBatchNorm2d, single process ----------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_syncbn_without_process_group_is_batchnorm(momentum, channels_last):
    torch.manual_seed(0)
    sync, bn = SyncBatchNorm2d(16, momentum=momentum), nn.BatchNorm2d(16, momentum=momentum)
    with torch.no_grad():
        for m in (sync, bn):
            m.weight.copy_(torch.linspace(0.5, 2, 16))
            m.bias.copy_(torch.linspace(-1, 1, 16))
    for step in range(3):
        x = _x(c=16, seed=step)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn_like(x)
        outs = []
        for m in (sync, bn):
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y * w).sum().backward()
            outs.append((y, xi.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(sync.state_dict().values(), bn.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(sync.weight.grad, bn.weight.grad) and torch.equal(sync.bias.grad, bn.bias.grad)
    sync.eval(), bn.eval()
    x = _x(c=16, seed=9)
    assert torch.equal(sync(x), bn(x))


def test_syncbn_rejects_non_4d():
    m = SyncBatchNorm2d(8)
    with pytest.raises(ValueError, match="4-D NCHW.*3-D"):
        m(torch.randn(2, 8, 5))


# --- SyncBatchNorm2d on 2 gloo ranks == BatchNorm2d on the concatenated batch -----------------

C = 6
SPLITS = [(4, 4), (3, 5)]  # step 1: per-rank batch b = 4; step 2: uneven batches (Chan weighting)


def _params():
    return torch.linspace(0.5, 2.0, C), torch.linspace(-1.0, 1.0, C)


def _make_data(path):
    g = torch.Generator().manual_seed(1234)
    data = {}
    for step, (b0, b1) in enumerate(SPLITS):
        n = b0 + b1
        x = torch.randn(n, C, 5, 7, generator=g) * 2 + 5
        x[b0:] = x[b0:] * 1.5 + 3  # rank 1's samples have other statistics: local BN != global BN
        data[f"x{step}"] = x
        data[f"w{step}"] = torch.randn(n, C, 5, 7, generator=g)  # loss = sum(y * w)
    data["x_one"] = torch.randn(2, C, 1, 1, generator=g) * 2 + 5  # one 1x1 image per rank
    data["w_one"] = torch.randn(2, C, 1, 1, generator=g)
    torch.save(data, path)
    return data


def _run_steps(model, xs, ws, channels_last_step=1):
    """Two training steps (forward + backward); returns outputs, input grads and param grads."""
    out = {}
    for step, (x, w) in enumerate(zip(xs, ws)):
        if step == channels_last_step:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.clone().requires_grad_()
        y = model(x)
        (y * w).sum().backward()
        out[f"y{step}"], out[f"gx{step}"] = y.detach(), x.grad
    out["gweight"], out["gbias"] = model.weight.grad.clone(), model.bias.grad.clone()
    out["running_mean"], out["running_var"] = model.running_mean.clone(), model.running_var.clone()
    out["num_batches_tracked"] = model.num_batches_tracked.clone()
    return out


def _with_params(m):
    w, b = _params()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def _conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), _with_params(SyncBatchNorm2d(C)))
    return net.double()


def _worker(rank, tmp):
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections stay on loopback
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2)
    try:
        data = torch.load(f"{tmp}/data.pt")
        xs, ws = [], []
        for step, (b0, b1) in enumerate(SPLITS):
            sl = slice(0, b0) if rank == 0 else slice(b0, b0 + b1)
            xs.append(data[f"x{step}"][sl])
            ws.append(data[f"w{step}"][sl])
        res = {"sync": _run_steps(_with_params(SyncBatchNorm2d(C)), xs, ws),
               "local": _run_steps(_with_params(nn.BatchNorm2d(C)), xs, ws)}  # negative control
        # One 1x1 image per rank: one value per channel here, two across the ranks, so syncbn trains
        # where BatchNorm2d refuses (models.check_batch_stats lets syncbn through on 2+ ranks).
        one = slice(rank, rank + 1)
        res["one"] = _run_steps(_with_params(SyncBatchNorm2d(C)), [data["x_one"][one]], [data["w_one"][one]])

        # Eval mode uses the running statistics: identical to BatchNorm2d in eval.
        sync = _with_params(SyncBatchNorm2d(C))
        _run_steps(sync, xs, ws)
        ref = _with_params(nn.BatchNorm2d(C))
        ref.load_state_dict(sync.state_dict())
        sync.eval(), ref.eval()
        res["eval_equal"] = torch.equal(sync(xs[0]), ref(xs[0]))

        # A one-rank process group: plain BatchNorm2d (world size 1), bit for bit.
        singles = [dist.new_group([0]), dist.new_group([1])]  # every rank creates every group
        own = SyncBatchNorm2d(C)
        own.process_group = singles[rank]
        own = _run_steps(_with_params(own), xs, ws)
        res["own_group_equal"] = all(torch.equal(own[k], res["local"][k]) for k in own)
        # Inside DDP on CPU (DDP refuses torch's nn.SyncBatchNorm there): the averaged conv gradient
        # times the world size is the single-process gradient of the summed loss. In float64, as
        # the conv gradient sums 8 * 35 * 9 products whose float32 rounding differs by ~3e-5.
        ddp = nn.parallel.DistributedDataParallel(_conv_net())
        (ddp(xs[0].double()) * ws[0].double()).sum().backward()
        res["ddp_grad"] = ddp.module[0].weight.grad * dist.get_world_size()
        torch.save(res, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_syncbn_two_gloo_ranks_equals_global_batchnorm(tmp_path):
    import torch.multiprocessing as mp

    data = _make_data(tmp_path / "data.pt")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    # Reference: one process, BatchNorm2d on both ranks' samples concatenated, loss summed.
    ref = _run_steps(_with_params(nn.BatchNorm2d(C)), [data["x0"], data["x1"]], [data["w0"], data["w1"]])

    s0, s1 = r0["sync"], r1["sync"]
    for step in range(len(SPLITS)):
        for key in (f"y{step}", f"gx{step}"):
            torch.testing.assert_close(torch.cat([s0[key], s1[key]]), ref[key], **TOL)
    # Each rank's parameter gradient is its share; DDP sums (then averages) them across ranks.
    torch.testing.assert_close(s0["gweight"] + s1["gweight"], ref["gweight"], **TOL)
    torch.testing.assert_close(s0["gbias"] + s1["gbias"], ref["gbias"], **TOL)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(s0[key], ref[key], **TOL)
        assert torch.equal(s0[key], s1[key])  # both ranks computed the same global statistics
    assert s0["num_batches_tracked"] == s1["num_batches_tracked"] == 2

    # Negative control: per-rank BatchNorm2d does not reproduce the global batch.
    l0, l1 = r0["local"], r1["local"]
    assert (torch.cat([l0["y0"], l1["y0"]]) - ref["y0"]).abs().max() > 0.1
    assert (l0["running_mean"] - ref["running_mean"]).abs().max() > 0.1
    assert (l0["gweight"] + l1["gweight"] - ref["gweight"]).abs().max() > 0.1

    for r in (r0, r1):
        assert r["eval_equal"] and r["own_group_equal"]

    # 1 image of 1x1 per rank == BatchNorm2d on the 2 images; BatchNorm2d on 1 of them refuses.
    ref = _run_steps(_with_params(nn.BatchNorm2d(C)), [data["x_one"]], [data["w_one"]])
    o0, o1 = r0["one"], r1["one"]
    for key in ("y0", "gx0"):
        torch.testing.assert_close(torch.cat([o0[key], o1[key]]), ref[key], **TOL)
    torch.testing.assert_close(o0["gweight"] + o1["gweight"], ref["gweight"], **TOL)
    torch.testing.assert_close(o0["gbias"] + o1["gbias"], ref["gbias"], **TOL)
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(o0[key], ref[key], **TOL)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        _with_params(nn.BatchNorm2d(C))(data["x_one"][:1])

    net = _conv_net()  # no process group here: plain BatchNorm2d on the whole batch
    (net(data["x0"].double()) * data["w0"].double()).sum().backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["ddp_grad"], net[0].weight.grad, atol=1e-10, rtol=1e-10)
