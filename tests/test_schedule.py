import math

import pytest

from imnet.schedule import get_lr, peak_lr


def test_linear_scaling_rule():
    assert peak_lr(0.1, 256, "linear") == pytest.approx(0.1)
    assert peak_lr(0.1, 64, "linear") == pytest.approx(0.025)
    assert peak_lr(0.1, 64, "none") == 0.1


def test_warmup_then_cosine():
    kw = dict(peak=1.0, steps_per_epoch=10, total_steps=100, schedule="cosine", warmup_epochs=1)
    assert [get_lr(s, **kw) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert get_lr(9, **kw) == pytest.approx(1.0)
    assert get_lr(10, **kw) == pytest.approx(1.0)            # cosine starts at the peak
    assert get_lr(55, **kw) == pytest.approx(0.5)            # halfway through the decay
    assert get_lr(100, **kw) == pytest.approx(0.0, abs=1e-12)


def test_cosine_floor():
    lr = get_lr(100, peak=1.0, steps_per_epoch=10, total_steps=100, schedule="cosine", min_lr=0.01)
    assert lr == pytest.approx(0.01)


def test_step_schedule():
    kw = dict(peak=0.8, steps_per_epoch=10, total_steps=100, schedule="step", milestones=(3, 6), gamma=0.1)
    assert get_lr(29, **kw) == pytest.approx(0.8)
    assert get_lr(30, **kw) == pytest.approx(0.08)
    assert get_lr(60, **kw) == pytest.approx(0.008)


def test_constant_and_pure():
    kw = dict(peak=0.3, steps_per_epoch=7, total_steps=70, schedule="constant")
    assert {get_lr(s, **kw) for s in range(70)} == {0.3}
    with pytest.raises(ValueError):
        get_lr(0, peak=1, steps_per_epoch=1, total_steps=1, schedule="poly")
    assert not math.isnan(get_lr(0, peak=1, steps_per_epoch=1, total_steps=1, schedule="cosine"))
