"""The one owner of metric names: what each epoch logs, what a test reports, and the rule that ties them.

An epoch metric is ``<split>_<score>`` (``val_balanced_accuracy``): the split it was measured on and a score a test
also reports. Every name in metrics.csv, the loggers, ``trainer.monitor``, cross-validation and the model card comes
from here, so a new score is added in one place.
"""

from __future__ import annotations

from cellcls.errors import ConfigError

SPLITS = ("train", "val")
# the training run's final test of best.pt (test_metrics.json), and each cross-validation fold's:
TEST_METRICS = ("loss", "accuracy", "balanced_accuracy", "roc_auc")
# each epoch logs these (metrics.csv columns, logger keys, trainer.monitor choices):
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy")
EPOCH_EXTRAS = ("lr", "epoch_time_s")  # logged beside them, not monitorable
# `evaluate` reports these with a bootstrap interval (sensitivity/specificity for two classes only):
HEADLINE = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")
MODES = ("auto", "min", "max")


def split_metric(name: str) -> tuple[str, str]:
    """``val_balanced_accuracy`` -> ``("val", "balanced_accuracy")``; a name that is no epoch metric is refused."""
    if name not in EPOCH_METRICS:
        raise ConfigError(f"{name!r} is not an epoch metric; they are: {', '.join(EPOCH_METRICS)}")
    split, _, score = name.partition("_")
    return split, score


def epoch_metrics(split: str, **scores: float) -> dict[str, float]:
    """``epoch_metrics("val", loss=0.3)`` -> ``{"val_loss": 0.3}``, refusing a name the list above lacks."""
    named = {f"{split}_{score}": float(value) for score, value in scores.items()}
    unknown = sorted(set(named) - set(EPOCH_METRICS))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} are not epoch metrics (cellcls.metric_names.EPOCH_METRICS)")
    return named


def held_out_score(monitor: str) -> str:
    """The test score that stands for a monitored validation metric (``val_loss`` -> ``loss``): what
    cross-validation reports and a search optimises. A training-split metric has none, and is refused."""
    split, score = split_metric(monitor)
    if split != "val":
        raise ConfigError(f"trainer.monitor={monitor} is measured on the training split; cross-validation scores "
                          "held-out folds, so monitor a validation metric "
                          f"({', '.join(m for m in EPOCH_METRICS if m.startswith('val_'))})")
    return score


def metric_mode(metric: str, mode: str = "auto") -> str:
    """'min' for losses, 'max' for everything else, unless ``mode`` says otherwise."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric else "max"
