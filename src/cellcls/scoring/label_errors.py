"""Likely label errors by confident learning (Northcutt, Jiang & Chuang 2021), from out-of-fold probabilities.

Each class ``j`` gets a threshold ``t_j``: the mean probability of ``j`` over the images labelled ``j`` (how sure the
models are, on average, of an image that is ``j``). An image's *confident* label is its most probable class among
those whose probability reaches their threshold; an image whose confident label exists and differs from its given
one is a likely label error ("confident joint", off-diagonal). Issues are ranked by self-confidence, the probability
of the given label, lowest first; every other image follows in the same order.

Why not cleanlab: this is its ``find_label_issues(filter_by="confident_learning", return_indices_ranked_by=
"self_confidence")`` rule in 20 lines of numpy, without its dependencies, on the ``cv_predictions.csv`` cellcls writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelReview:
    order: np.ndarray  # image indices, most doubtful first
    issue: np.ndarray  # bool per image: the confident label differs from the given one
    suggested: np.ndarray  # per image: the confident label (the most probable class where none is confident)
    thresholds: np.ndarray  # per class


def review_labels(labels: np.ndarray, probs: np.ndarray) -> LabelReview:
    """Rank images by how much the out-of-fold models doubt their given label."""
    labels = np.asarray(labels, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = probs.shape
    thresholds = np.array([probs[labels == j, j].mean() if (labels == j).any() else np.inf for j in range(k)])
    confident = probs >= thresholds[None, :]
    masked = np.where(confident, probs, -np.inf)
    suggested = np.where(confident.any(axis=1), masked.argmax(axis=1), probs.argmax(axis=1))
    issue = confident.any(axis=1) & (suggested != labels)
    self_confidence = probs[np.arange(n), labels]
    order = np.lexsort((self_confidence, ~issue))  # issues first, then by self-confidence
    return LabelReview(order, issue, suggested, thresholds)
