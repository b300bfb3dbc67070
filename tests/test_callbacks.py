"""Early stopping and LR-on-plateau on a scripted metric sequence (the S4 settings)."""

from __future__ import annotations

import math

import pytest
import torch

from cellcls.training.callbacks import EarlyStopping
from cellcls.training.optim import build_scheduler
from cellcls.training.state import Monitor


def test_early_stopping_fires_after_patience_epochs_without_improvement():
    stopper = EarlyStopping(patience=3, min_delta=0.0)
    losses = [1.0, 0.8, 0.7, 0.71, 0.70, 0.75]
    assert [stopper.step(v, "min") for v in losses] == [False, False, False, False, False, True]
    assert stopper.best == 0.7


def test_early_stopping_on_accuracy_maximises():
    stopper = EarlyStopping(patience=1, min_delta=0.0)
    assert [stopper.step(v, "max") for v in (0.5, 0.6, 0.55)] == [False, False, True]


def test_min_delta_ignores_tiny_improvements():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.step(v, "min") for v in (1.0, 0.995, 0.995)] == [False, False, True]


def test_early_stopping_state_survives_a_checkpoint():
    stopper = EarlyStopping(patience=3, min_delta=0.0)
    for v in (1.0, 1.1, 1.2):
        stopper.step(v, "min")
    resumed = EarlyStopping(patience=3, min_delta=0.0)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.step(1.3, "min") is True


def test_the_monitor_tracks_the_best_epoch_without_a_margin():
    monitor = Monitor("val_loss", "min")
    assert [monitor.update(v, e) for e, v in enumerate([1.0, 0.8, 0.8, 0.79], start=1)] == [True, True, False, True]
    assert (monitor.best, monitor.best_epoch) == (0.79, 4)


def test_a_nan_monitored_metric_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="val_loss is NaN"):
        Monitor("val_loss", "min").update(math.nan, 4)


def test_plateau_scheduler_with_s4_settings_drops_lr_by_factor_after_two_flat_epochs():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, {"name": "plateau", "factor": 0.3, "patience": 2, "min_lr": 1e-6, "threshold": 1e-4, "cooldown": 0}, 25, "min")
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
    scheduler = build_scheduler(optimizer, {"name": "plateau", "factor": 0.3, "patience": 0, "min_lr": 1e-6, "threshold": 1e-4, "cooldown": 0}, 25, "min")
    for _ in range(5):
        scheduler.step(1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
