"""Scores of a multi-label model (one sigmoid per finding): per-finding ROC-AUC and average precision with
group-aware intervals, macro and micro averages, and per-finding thresholds fitted on validation.

Targets are ``N x K`` arrays of 1 / 0 / NaN (uncertain, left out of that finding). ROC-AUC and average precision get
the delete-one-group jackknife on the logit scale (:func:`~cellcls.scoring.intervals.jackknife_logit_interval`),
sensitivity and specificity at the threshold the grouped proportion interval, as single-label metrics do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cellcls.scoring.intervals import RATE_METHOD, group_counts, jackknife_logit_interval, proportion_interval

DEFAULT_THRESHOLD = 0.5


def finding_text(row: Sequence[float], findings: Sequence[str]) -> str:
    """A target or decision row as ChestX-ray14 writes it: ``Effusion|Mass``, ``No Finding``, ``?`` marking an
    uncertain finding (``Effusion|?Mass``)."""
    named = [("?" + f if math.isnan(v) else f) for f, v in zip(findings, row, strict=True) if math.isnan(v) or v == 1]
    return "|".join(named) or "No Finding"



def finding_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Each finding's probability: the sigmoid of its logit."""
    return torch.sigmoid(logits.float())


def _known(y: np.ndarray, k: int) -> np.ndarray:
    return ~np.isnan(y[:, k])


def _defined(y: np.ndarray) -> bool:
    return bool((y == 1).any() and (y == 0).any())


def finding_auc(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Finding ``k``'s ROC-AUC over its known entries; NaN without both values."""
    known = _known(y, k)
    t = y[known, k]
    return float(roc_auc_score(t, p[known, k])) if _defined(t) else math.nan


def finding_ap(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Finding ``k``'s average precision (area under its precision-recall curve); NaN without a positive."""
    known = _known(y, k)
    t = y[known, k]
    return float(average_precision_score(t, p[known, k])) if _defined(t) else math.nan


def macro(values: Sequence[float]) -> float:
    """The mean over the findings where a value is defined."""
    kept = [v for v in values if math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def micro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC of every known (image, finding) pair pooled."""
    known = ~np.isnan(y)
    return float(roc_auc_score(y[known], p[known])) if _defined(y[known]) else math.nan


def micro_ap(y: np.ndarray, p: np.ndarray) -> float:
    known = ~np.isnan(y)
    return float(average_precision_score(y[known], p[known])) if _defined(y[known]) else math.nan


def epoch_scores(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """What each epoch reports for a multi-label model, under the single-label metric names: exact-match accuracy
    (every known finding right at p > 0.5), balanced accuracy (its mean over findings) and macro ROC-AUC."""
    predicted = p > DEFAULT_THRESHOLD
    known = ~np.isnan(y)
    exact = float((~((predicted != (y == 1)) & known).any(axis=1)).mean())
    balanced = []
    for k in range(y.shape[1]):
        t, hit = y[known[:, k], k], predicted[known[:, k], k]
        if _defined(t):
            balanced.append(((hit[t == 1]).mean() + (~hit[t == 0]).mean()) / 2)
    return exact, macro(balanced), macro([finding_auc(y, p, k) for k in range(y.shape[1])])


def fit_thresholds(y: np.ndarray, p: np.ndarray) -> list[float]:
    """Per finding, the threshold of largest Youden's J (sensitivity + specificity - 1) on these predictions
    (validation); 0.5 where the finding lacks a positive or a negative."""
    thresholds = []
    for k in range(y.shape[1]):
        known = _known(y, k)
        t = y[known, k]
        if not _defined(t):
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        fpr, tpr, cut = roc_curve(t, p[known, k])
        best = int(np.argmax(tpr - fpr))
        thresholds.append(float(min(cut[best], 1.0)))  # roc_curve's first cut is +inf: nothing positive
    return thresholds


def _interval(statistic: Any, y: np.ndarray, p: np.ndarray, k: int, groups: Sequence[str] | None) -> list[float]:
    known = _known(y, k)
    yk, pk = y[known], p[known]
    g = None if groups is None else list(np.asarray(groups)[known])
    return list(jackknife_logit_interval(lambda idx: statistic(yk[idx], pk[idx], k), g, int(known.sum())))


def _rate(cases: np.ndarray, hits: np.ndarray, groups: Sequence[str] | None) -> dict[str, Any]:
    value = float(hits[cases].mean()) if cases.any() else math.nan
    return {"value": value, "ci95": list(proportion_interval(*group_counts(cases, hits, groups)))}


def multilabel_metrics(y: np.ndarray, p: np.ndarray, findings: list[str], thresholds: Sequence[float] | None = None,
                       groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Per finding: positives, ROC-AUC and average precision with 95% intervals (jackknife over groups), and
    sensitivity / specificity at its threshold; macro and micro ROC-AUC and AP; exact-match accuracy at the
    thresholds."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    cuts = list(thresholds) if thresholds is not None else [DEFAULT_THRESHOLD] * len(findings)
    per: dict[str, Any] = {}
    for k, name in enumerate(findings):
        known = _known(y, k)
        positive = p[:, k] >= cuts[k]
        per[name] = {
            "positives": int((y[:, k] == 1).sum()), "negatives": int((y[:, k] == 0).sum()),
            "uncertain": int((~known).sum()),
            "roc_auc": {"value": finding_auc(y, p, k), "ci95": _interval(finding_auc, y, p, k, groups)},
            "average_precision": {"value": finding_ap(y, p, k), "ci95": _interval(finding_ap, y, p, k, groups)},
            "prevalence": float((y[known, k] == 1).mean()) if known.any() else math.nan,
            "threshold": cuts[k],
            "sensitivity": _rate(known & (y[:, k] == 1), positive, groups),
            "specificity": _rate(known & (y[:, k] == 0), ~positive, groups),
        }
    predicted = p >= np.asarray(cuts)[None, :]
    exact = ~((predicted != (y == 1)) & ~np.isnan(y)).any(axis=1)
    units = len(set(groups)) if groups is not None else len(y)
    return {
        "task": "multilabel", "num_images": len(y), "findings": per,
        "macro_roc_auc": macro([per[f]["roc_auc"]["value"] for f in findings]),
        "macro_average_precision": macro([per[f]["average_precision"]["value"] for f in findings]),
        "micro_roc_auc": micro_auc(y, p), "micro_average_precision": micro_ap(y, p),
        "exact_match_accuracy": _rate(np.ones(len(y), bool), exact, groups),
        "interval": {"level": 0.95, "groups": units,
                     "method": f"ROC-AUC and AP: jackknife over {'groups' if groups is not None else 'images'} "
                               f"(logit, t); rates: {RATE_METHOD} over them"},
    }


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """One line per finding and the averages, as the evaluate command prints them."""
    def fmt(entry: dict[str, Any]) -> str:
        lo, hi = entry["ci95"]
        ci = f" ({lo:.3f}-{hi:.3f})" if math.isfinite(lo) else ""
        return f"{entry['value']:.3f}{ci}"

    lines = [f"{'finding':<20} {'pos':>5} {'ROC-AUC (95% CI)':>22} {'AP (95% CI)':>22} {'thr':>6} {'sens':>6} "
             f"{'spec':>6}"]
    for name, m in metrics["findings"].items():
        lines.append(f"{name:<20} {m['positives']:>5} {fmt(m['roc_auc']):>22} {fmt(m['average_precision']):>22} "
                     f"{m['threshold']:>6.3f} {m['sensitivity']['value']:>6.3f} {m['specificity']['value']:>6.3f}")
    lines.append(f"macro ROC-AUC {metrics['macro_roc_auc']:.4f}  macro AP {metrics['macro_average_precision']:.4f}  "
                 f"micro ROC-AUC {metrics['micro_roc_auc']:.4f}  micro AP {metrics['micro_average_precision']:.4f}  "
                 f"exact match {fmt(metrics['exact_match_accuracy'])}")
    return lines


def chance_level(metric: str, val: np.ndarray, train: np.ndarray) -> float:
    """What ``metric`` (an epoch metric) scores for a model that predicts each finding's training prevalence on
    the split it is measured on: the BCE of those prevalences for the loss, the exact-match accuracy of each
    finding's more frequent value, 0.5 for balanced accuracy and ROC-AUC."""
    from cellcls.metric_names import split_metric

    split, name = split_metric(metric)
    measured = val if split == "val" else train
    prevalence = np.clip(np.nanmean(train, axis=0), 1e-6, 1 - 1e-6)
    known = ~np.isnan(measured)
    if name == "loss":
        bce = -(np.nan_to_num(measured) * np.log(prevalence) + (1 - np.nan_to_num(measured)) * np.log(1 - prevalence))
        return float(bce[known].mean()) if known.any() else math.nan
    if name == "accuracy":
        guess = (prevalence > 0.5)[None, :]
        return float((~((guess != (measured == 1)) & known).any(axis=1)).mean()) if len(measured) else math.nan
    return 0.5


@dataclass(frozen=True)
class FindingRule:
    """How a multi-label model's logits become findings: sigmoid, then finding k when its probability is at least
    ``thresholds[k]`` (fitted on validation for the largest Youden's J, or for ``operating_point``; 0.5 each when
    none were fitted). Stored in
    the checkpoint's ``calibration`` and the model card."""

    thresholds: tuple[float, ...]
    fitted_on: str | None = None
    operating_point: str | None = None  # e.g. "sensitivity:0.9", what every threshold was chosen for; None: Youden

    @classmethod
    def of(cls, stored: dict[str, Any] | None, count: int) -> FindingRule:
        stored = stored or {}
        cuts = stored.get("thresholds")
        if cuts is None or len(cuts) != count:
            return cls(tuple([DEFAULT_THRESHOLD] * count))
        return cls(tuple(float(c) for c in cuts), stored.get("fitted_on"), stored.get("operating_point"))

    def to_dict(self) -> dict[str, Any]:
        return {"task": "multilabel", "thresholds": list(self.thresholds), "fitted_on": self.fitted_on,
                "operating_point": self.operating_point}

    def findings(self, probs: np.ndarray) -> np.ndarray:
        """Boolean ``N x K``: each finding present by its threshold."""
        return np.asarray(probs) >= np.asarray(self.thresholds)[None, :]

    def names(self, probs: np.ndarray, findings: Sequence[str]) -> list[str]:
        """Each row's findings by their thresholds, as ChestX-ray14 writes them (``Effusion|Mass``, ``No Finding``)."""
        return [finding_text(row.astype(float), findings) for row in self.findings(probs)]
