"""Early stopping and LR-on-plateau on a scripted metric sequence (the S4 settings)."""

from __future__ import annotations

import math

import pytest
import torch

from cellcls.callbacks import EarlyStopping
from cellcls.optim import build_scheduler


def test_early_stopping_fires_after_patience_epochs_without_improvement():
    stopper = EarlyStopping("val_loss", patience=3)
    losses = [1.0, 0.8, 0.7, 0.71, 0.70, 0.75, 0.6]
    stops = [stopper.step(v, e)[1] for e, v in enumerate(losses[:6], start=1)]
    assert stops == [False, False, False, False, False, True]
    assert stopper.best == 0.7 and stopper.best_epoch == 3


def test_early_stopping_on_accuracy_maximises():
    stopper = EarlyStopping("val_accuracy", patience=1)
    assert stopper.step(0.5, 1) == (True, False)
    assert stopper.step(0.6, 2) == (True, False)
    assert stopper.step(0.55, 3) == (False, True)


def test_min_delta_ignores_tiny_improvements():
    stopper = EarlyStopping("val_loss", patience=2, min_delta=0.01)
    stopper.step(1.0, 1)
    assert stopper.step(0.995, 2) == (False, False)
    assert stopper.step(0.995, 3) == (False, True)


def test_nan_metric_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="val_loss is NaN"):
        EarlyStopping("val_loss").step(math.nan, 4)


def test_plateau_scheduler_with_s4_settings_drops_lr_by_factor_after_two_flat_epochs():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, {"name": "plateau", "factor": 0.3, "patience": 2, "min_lr": 1e-6}, 25, "min")
    lrs = []
    for value in [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]:
        scheduler.step(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:3] == [1e-3] * 3
    assert lrs[3] == pytest.approx(3e-4)  # Keras: wait reached patience (2) after epochs 3 and 4
    assert lrs[4] == pytest.approx(3e-4)
    assert lrs[5] == pytest.approx(9e-5)
    assert lrs[6] == pytest.approx(9e-5)


def test_plateau_scheduler_never_goes_below_min_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-6)
    scheduler = build_scheduler(optimizer, {"name": "plateau", "factor": 0.3, "patience": 0, "min_lr": 1e-6}, 25, "min")
    for _ in range(5):
        scheduler.step(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
