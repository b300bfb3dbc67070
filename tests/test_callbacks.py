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


def test_chance_is_what_knowing_only_the_class_frequencies_scores():
    from cellcls.scoring.metrics import beyond_chance, chance_level

    train, val = [0] * 75 + [1] * 25, [0] * 20 + [1] * 20
    assert chance_level("val_loss", val, train, 2) == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)
    assert chance_level("val_accuracy", val, train, 2) == 0.5  # the training majority class, on val
    assert chance_level("train_accuracy", val, train, 2) == 0.75
    assert chance_level("val_balanced_accuracy", val, train, 2) == 0.5
    assert beyond_chance("val_loss", 0.7) == pytest.approx(0.665) and beyond_chance("val_accuracy", 0.5) == 0.55


class _State:
    """What EarlyStopping reads of a fit."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor, self.should_stop = monitor, False


def test_patience_counts_only_from_the_first_epoch_clearly_better_than_chance():
    """The issue's run: an uncertain first epoch (0.692, chance 0.693) stayed 'best' while the model grew confident
    before it grew right, and patience 3 stopped it at epoch 4 near chance. Now waiting starts at epoch 8."""
    losses = [0.692, 0.702, 0.786, 0.746, 0.877, 1.180, 0.787, 0.484, 0.421, 0.382, 0.594, 0.381, 0.304]
    monitor = Monitor("val_loss", "min", chance=0.6586)
    stopper, state = EarlyStopping(patience=3, min_delta=0.0), None
    state = _State(monitor)
    for epoch, value in enumerate(losses, start=1):
        monitor.update(value, epoch)
        stopper.on_validation_end(state, {"val_loss": value})
        assert not state.should_stop, epoch
    assert monitor.beat_chance and monitor.best_epoch == 13
    for epoch, value in enumerate([0.35, 0.36, 0.37], start=14):  # then patience works as before
        monitor.update(value, epoch)
        stopper.on_validation_end(state, {"val_loss": value})
    assert state.should_stop


def test_a_monitor_without_a_chance_level_counts_patience_from_the_start():
    monitor = Monitor("val_loss", "min")
    monitor.update(0.9, 1)
    assert monitor.beat_chance


def test_the_plateau_scheduler_counts_no_bad_epochs_before_chance_is_beaten_but_cosine_still_steps():
    from cellcls.training.optim import step_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    plateau = build_scheduler(optimizer, {"name": "plateau", "factor": 0.3, "patience": 2, "min_lr": 1e-6,
                                          "threshold": 1e-4, "cooldown": 0}, 25, "min")
    for value in [0.69, 0.70, 0.78, 0.75, 0.88]:
        step_scheduler(plateau, value, patience=False)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    cosine_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = build_scheduler(cosine_opt, {"name": "cosine", "min_lr": 0.0}, 10, "min")
    step_scheduler(cosine, 0.7, patience=False)
    assert cosine_opt.param_groups[0]["lr"] < 1.0
