"""Classification metrics with bootstrap confidence intervals (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    roc_auc_score,
)

from cellcls.errors import ConfigError
from cellcls.metric_names import HEADLINE, split_metric
from cellcls.scoring.conformal import set_summary
from cellcls.scoring.heads import labels_of
from cellcls.scoring.intervals import (
    RATE_METHOD,
    group_counts,
    jackknife_logit_interval,
    mean_of_proportions_interval,
    placement_counts,
    proportion_interval,
)

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]

def chance_level(metric: str, split_labels: Sequence[int], train_labels: Sequence[int], num_classes: int) -> float:
    """What ``metric`` (an epoch metric) scores for a model that knows nothing but the training split's class
    frequencies, on the split the metric is measured on: the cross-entropy of predicting those frequencies for a
    loss, the share of the training split's most frequent class for accuracy, ``1 / classes`` for balanced accuracy."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes).astype(float)
    prior = np.clip(counts / max(counts.sum(), 1.0), 1e-12, 1.0)
    split, score = split_metric(metric)
    measured = np.asarray(split_labels if split == "val" else train_labels, dtype=np.int64)
    if score == "loss":
        return float(-np.log(prior[measured]).mean()) if len(measured) else math.nan
    if score == "balanced_accuracy":
        return 1.0 / num_classes
    return float((measured == int(counts.argmax())).mean()) if len(measured) else math.nan


CHANCE_MARGIN = 0.05  # "clearly better than chance": 5% below its loss, 5 points above its accuracy


def beyond_chance(metric: str, chance: float) -> float:
    """The value ``metric`` must beat to be clearly better than ``chance`` (an uncertain first epoch's loss sits
    a hair below the prior's)."""
    return chance * (1 - CHANCE_MARGIN) if split_metric(metric)[1] == "loss" else chance + CHANCE_MARGIN


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC: of class 1's probability for two classes, one-vs-rest macro average for more; NaN if undefined."""
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return float("nan")  # one-vs-rest needs every class in the sample
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))


def sensitivity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Recall of class 1 (the positive class: parasitized, malignant, pneumonia)."""
    positives = y_true == 1
    return float((y_pred[positives] == 1).mean()) if positives.any() else float("nan")


def specificity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Recall of class 0 (the negative class)."""
    negatives = y_true == 0
    return float((y_pred[negatives] == 0).mean()) if negatives.any() else float("nan")


def headline_metrics(num_classes: int) -> dict[str, Metric]:
    """The metrics reported with a confidence interval: f(y_true, y_pred, probs) -> value."""
    every: dict[str, Metric] = {
        "accuracy": lambda t, p, _: float(accuracy_score(t, p)),
        "balanced_accuracy": lambda t, p, _: float(balanced_accuracy_score(t, p)) if len(np.unique(t)) > 1 else float("nan"),
        "roc_auc": lambda t, _, pr: roc_auc(t, pr),
        "sensitivity": lambda t, p, _: sensitivity(t, p),
        "specificity": lambda t, p, _: specificity(t, p),
    }
    binary_only = ("sensitivity", "specificity")
    return {k: every[k] for k in HEADLINE if num_classes == 2 or k not in binary_only}


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    metric: Metric,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` (seeded, so reports are reproducible). With ``groups`` (the
    patient of each image) whole groups are resampled: images of one patient are not independent, and resampling
    them one by one gives intervals far too narrow."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    members = None
    if groups is not None:
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    values = []
    with warnings.catch_warnings():
        # a resample may lack a class; sklearn warns each time, and such resamples are expected
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(n_boot):
            if members is None:
                idx = rng.integers(0, n, n)
            else:
                idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            value = metric(y_true[idx], y_pred[idx], probs[idx])
            if not np.isnan(value):
                values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


INTERVALS = ("grouped", "bootstrap")


@dataclass(frozen=True)
class IntervalRule:
    """How the 95% intervals are computed: ``grouped`` (the default) or ``bootstrap`` with ``resamples``."""

    method: str = "grouped"
    resamples: int = 1000

    def __post_init__(self) -> None:
        if self.method not in INTERVALS:
            raise ConfigError(f"interval={self.method!r} is not valid; allowed values: {', '.join(INTERVALS)}")
        if self.resamples < 1:
            raise ConfigError(f"bootstrap={self.resamples}: the number of resamples must be at least 1")


def evaluate_predictions(
    y_true: Sequence[int],
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    interval: str = "grouped",
) -> dict[str, Any]:
    """All metrics for one split: headline metrics with 95% intervals, the per-class report and the confusion matrix.

    ``interval="grouped"`` (the default, ``cellcls.scoring.intervals``): a Dirichlet-process posterior over groups
    (patients, or images when ``groups`` is None) for the proportions, the mean of per-class recall posteriors for
    balanced accuracy, for ROC-AUC the wider of a group jackknife on the logit scale and (two classes) the proportion
    interval of its placement values. ``interval="bootstrap"``: the percentile
    bootstrap over groups that cellcls reported before, kept for comparison (it undercovers on few patients); a
    proportion at exactly 0 or 1 then gets a Wilson interval on its groups. ``interval`` in the result says which."""
    if interval not in INTERVALS:
        raise ValueError(f"interval={interval!r}: expected one of {', '.join(INTERVALS)}")
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = labels_of(probs, threshold)
    labels = list(range(len(classes)))
    result: dict[str, Any] = {"num_images": len(y_true), "classes": list(classes)}
    if threshold is not None and len(classes) == 2:
        result["threshold"] = threshold
    n_groups = len(set(groups)) if groups is not None else None
    units = f"{n_groups} groups" if groups is not None else f"{len(y_true)} images"
    described = (f"{RATE_METHOD} over {units} (ROC-AUC: the wider of a jackknife over {units}, "
                 "logit, t, and its placement values)" if interval == "grouped"
                 else f"percentile bootstrap over {units}")
    result["interval"] = {"level": 0.95, "method": described, "images": len(y_true), "groups": n_groups,
                          **({"resamples": n_boot} if interval == "bootstrap" else {})}
    for name, metric in headline_metrics(len(classes)).items():
        value = metric(y_true, y_pred, probs)
        if interval == "grouped":
            result[name] = {"value": value, "ci95": list(_grouped_interval(name, metric, value, y_true, y_pred, probs,
                                                                          groups, seed))}
        else:
            result[name] = _bootstrap_entry(name, metric, value, y_true, y_pred, probs, groups, n_boot, seed)
    result["per_class"] = classification_report(
        y_true, y_pred, labels=labels, target_names=list(classes), output_dict=True, zero_division=0
    )
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return result


def _grouped_interval(name: str, metric: Metric, value: float, y_true: np.ndarray, y_pred: np.ndarray,
                      probs: np.ndarray, groups: Sequence[str] | None, seed: int) -> tuple[float, float]:
    cases = _proportion_cases(name, y_true)
    correct = y_pred == y_true
    if cases is not None:
        return proportion_interval(*group_counts(cases, correct, groups))
    if name == "balanced_accuracy":
        present = np.unique(y_true)
        if len(present) < 2:
            return float("nan"), float("nan")
        return mean_of_proportions_interval([group_counts(y_true == c, correct, groups) for c in present], seed=seed)
    if name == "roc_auc" and probs.shape[1] == 2:
        if math.isnan(value):
            return float("nan"), float("nan")
        lo, hi = proportion_interval(*placement_counts(y_true, probs[:, 1], groups))
        if 0.0 < value < 1.0:
            jack = jackknife_logit_interval(lambda idx: metric(y_true[idx], y_pred[idx], probs[idx]), groups,
                                            len(y_true))
            lo, hi = float(np.fmin(lo, jack[0])), float(np.fmax(hi, jack[1]))
        return lo, hi
    if value in (0.0, 1.0):
        # every pair ordered (or none): the jackknife has no spread; the interval of a proportion at that value, one
        # unit per group of the rarer class (conservative, as the rarer class bounds how much was tested)
        present = np.unique(y_true)
        rarer = present[np.bincount(y_true)[present].argmin()]
        units = _units(y_true == rarer, groups)
        return proportion_interval(np.full(units, int(value)), np.ones(units, int))
    return jackknife_logit_interval(lambda idx: metric(y_true[idx], y_pred[idx], probs[idx]), groups, len(y_true))


def _bootstrap_entry(name: str, metric: Metric, value: float, y_true: np.ndarray, y_pred: np.ndarray,
                     probs: np.ndarray, groups: Sequence[str] | None, n_boot: int, seed: int) -> dict[str, Any]:
    unit = "groups" if groups is not None else "images"
    cases = _proportion_cases(name, y_true)
    if cases is not None and value in (0.0, 1.0) and cases.any():
        n = _units(cases, groups)
        lo, hi = wilson_interval(round(value * n), n)
        return {"value": value, "ci95": [lo, hi], "method": f"Wilson ({unit}: {n})"}
    if name == "balanced_accuracy" and value in (0.0, 1.0):
        # the mean of per-class recalls, each at 0 or 1: the mean of their Wilson intervals
        counts = [_units(y_true == c, groups) for c in np.unique(y_true)]
        bounds = np.array([wilson_interval(round(value * n), n) for n in counts])
        return {"value": value, "ci95": bounds.mean(axis=0).tolist(),
                "method": f"mean of per-class Wilson intervals ({unit}: {'/'.join(map(str, counts))})"}
    lo, hi = bootstrap_ci(y_true, y_pred, probs, metric, n_boot=n_boot, seed=seed, groups=groups)
    return {"value": value, "ci95": [lo, hi]}


def _units(cases: np.ndarray, groups: Sequence[str] | None) -> int:
    """How many independent units hold ``cases``: their groups when known, else the images."""
    return len(set(np.asarray(groups)[cases])) if groups is not None else int(cases.sum())


def _proportion_cases(name: str, y_true: np.ndarray) -> np.ndarray | None:
    """The cases a proportion-type metric counts over (None for metrics that are not a simple proportion)."""
    return {"accuracy": np.ones(len(y_true), bool), "sensitivity": y_true == 1, "specificity": y_true == 0}.get(name)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion (sound at 0 or n successes, unlike the normal approximation)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # at 0 or n successes one bound is exactly 0 or 1 (float rounding would leave 0.9999999999999999)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)


def prediction_set_metrics(
    y_true: Sequence[int], members: np.ndarray, classes: Sequence[str], level: float,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """How conformal prediction sets did: coverage (the true class in the set) with accuracy's interval (the
    grouped posterior where groups are known), mean set size, share of single-class sets, and each per true class."""
    y_true = np.asarray(y_true, dtype=int)
    covered = members[np.arange(len(y_true)), y_true].astype(int)
    value = float(covered.mean())
    ci = list(proportion_interval(*group_counts(np.ones(len(covered), bool), covered.astype(bool), groups)))
    out: dict[str, Any] = {"level": level, "coverage": {"value": value, "ci95": ci},
                           **{k: v for k, v in set_summary(members, y_true).items() if k != "coverage"},
                           "per_class": {}}
    for c, name in enumerate(classes):
        rows = y_true == c
        if rows.any():
            out["per_class"][name] = {"images": int(rows.sum()), **set_summary(members[rows], y_true[rows])}
    return out


def most_confused(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Off-diagonal cells of a confusion matrix (rows true, columns predicted), largest count first."""
    pairs = [{"true": classes[i], "predicted": classes[j], "count": int(n)}
             for i, row in enumerate(confusion) for j, n in enumerate(row) if i != j and n > 0]
    return sorted(pairs, key=lambda p: -p["count"])


def top_losses(y_true: Sequence[int], probs: np.ndarray, k: int = 9) -> list[tuple[int, float]]:
    """The ``k`` images with the largest cross-entropy loss (index, loss): the most confidently wrong first."""
    y_true = np.asarray(y_true, dtype=int)
    losses = -np.log(np.clip(np.asarray(probs)[np.arange(len(y_true)), y_true], 1e-12, 1.0))
    order = np.argsort(-losses, kind="stable")[:k]
    return [(int(i), float(losses[i])) for i in order]
