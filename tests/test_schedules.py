"""Optimizers and learning-rate schedules, stepped as the Trainer steps them."""

from __future__ import annotations

import pytest
import torch

from cifar_job.config import OPTIMIZERS, TrainConfig
from cifar_job.module import WarmupCosine, build_optimizer, build_schedule

TOTAL, PER_EPOCH = 100, 10


def lrs(scheduler: str, **overrides) -> list[float]:
    cfg = TrainConfig(scheduler=scheduler, lr=0.1, **overrides)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_schedule(cfg, opt, TOTAL, PER_EPOCH)
    out = []
    for _ in range(TOTAL):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_zero():
    lr = lrs("cosine", warmup_epochs=1.0)
    assert lr[0] == pytest.approx(0.01) and lr[9] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lr[:10], lr[1:10]))
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] < 0.001


def test_step_decays_by_gamma_every_step_epochs():
    lr = lrs("step", step_epochs=3.0, gamma=0.5)
    assert (
        lr[29] == pytest.approx(0.1)
        and lr[30] == pytest.approx(0.05)
        and lr[60] == pytest.approx(0.025)
    )


def test_exponential_decays_by_gamma_per_epoch():
    lr = lrs("exponential", gamma=0.5)
    assert lr[10] == pytest.approx(0.05) and lr[20] == pytest.approx(0.025)


def test_onecycle_peaks_at_lr():
    lr = lrs("onecycle")
    assert max(lr) == pytest.approx(0.1, rel=1e-3) and lr[0] < 0.01 and lr[-1] < 0.001


def test_cyclic_moves_between_lr_over_ten_and_lr():
    lr = lrs("cyclic", step_epochs=2.0)
    assert min(lr) == pytest.approx(0.01) and max(lr) == pytest.approx(0.1)
    assert lr[20] == pytest.approx(0.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_reduces_a_quadratic(name):
    cfg = TrainConfig(optimizer=name, lr=0.05, weight_decay=0.0)
    w = torch.nn.Parameter(torch.tensor([3.0]))
    opt = build_optimizer(cfg, [w])
    for _ in range(50):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert abs(w.item()) < 3.0 * 0.8


def test_a_longer_run_carries_the_cosine_on_without_raising_the_learning_rate():
    """--max-epochs 10 -> 20 after 40 of 100 steps: the factor at step 40 is kept, and the
    rest of the cosine is stretched over the 160 steps left; a second change composes."""
    first = WarmupCosine(warmup=10, total=100)
    longer = first.resized(200, step=40)
    assert longer(40) == pytest.approx(first(40))
    factors = [longer(s) for s in range(40, 201)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-9)
    shorter = WarmupCosine(**vars(longer)).resized(150, step=120)  # as LambdaLR saves it
    assert shorter(120) == pytest.approx(longer(120)) and shorter(150) == pytest.approx(0.0)
    assert first.resized(100, step=40)(70) == pytest.approx(first(70))  # same length: as before
