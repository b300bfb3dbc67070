"""Split-conformal prediction sets: the classes an image may be, holding the true one with a chosen probability.

Fitted on the validation split's calibrated probabilities (:func:`fit_conformal`), a threshold on a non-conformity
score makes the set ``{k : score_k <= threshold}``. When the validation and the new images are exchangeable, the
set holds the true class at least ``level`` of the time (Vovk et al. 2005; Angelopoulos & Bates 2021, section 1).

Two scores, chosen by the number of classes:

- ``lac`` (two classes; Sadinle et al. 2019): ``1 - p_k``. The smallest sets on average: one class where the model
  is sure, both ("cannot tell") where it is not.
- ``aps`` (more classes; Romano et al. 2020): the probability mass of the classes ranked at or above ``k``. Its
  sets adapt to how the probability is spread, where ``lac`` sets for several classes under-cover the hard images.
  The non-randomised form, so an image always gets the same set (its coverage is at or a little above ``level``).

The most probable class is always in the set (an empty set would only raise the coverage, and says nothing a person
can act on). A short implementation rather than MAPIE or TorchCP: the fit is a sorted quantile, the prediction one
comparison, and both must also run inside the web page and on exported models from the same stored numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cellcls.config.checks import check_fraction
from cellcls.errors import ConfigError

METHODS = ("lac", "aps")


def method_for(num_classes: int) -> str:
    """The score used for ``num_classes`` classes."""
    return "lac" if num_classes == 2 else "aps"


def scores(probs: np.ndarray, method: str) -> np.ndarray:
    """Every class's non-conformity score, ``N x C`` (lower: more plausible)."""
    probs = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - probs
    if method == "aps":
        order = np.argsort(-probs, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
        out = np.empty_like(probs)
        np.put_along_axis(out, order, mass, axis=1)
        return out
    raise ConfigError(f"conformal method {method!r} is not valid; allowed values: {', '.join(METHODS)}")


def check_level(level: object, setting: str = "conformal") -> float:
    """A coverage level strictly between 0 and 1."""
    return check_fraction(setting, level, "the coverage the prediction sets aim for")


def check_calibration_size(level: float, n: int, split: str = "the validation split") -> None:
    """Refuse a level that ``n`` calibration images cannot reach: the threshold is the ``ceil((n + 1) level)``-th
    smallest of ``n`` scores, so ``n`` must be at least ``level / (1 - level)``."""
    if math.ceil((n + 1) * level) > n:
        need = math.ceil(level / (1 - level) - 1e-9)
        raise ConfigError(f"conformal={level:g} needs at least {need} calibration images; {split} has {n}. "
                          "Choose a lower level or a larger validation split (dataset.val_fraction)")


@dataclass(frozen=True)
class ConformalFit:
    threshold: float
    method: str
    n: int


def fit_conformal(probs: np.ndarray, labels: np.ndarray, level: float, method: str | None = None) -> ConformalFit:
    """The split-conformal threshold: the ``ceil((n + 1) level)``-th smallest true-class score of ``n`` images."""
    level = check_level(level)
    method = method or method_for(probs.shape[1])
    labels = np.asarray(labels, dtype=np.int64)
    true_scores = np.sort(scores(probs, method)[np.arange(len(labels)), labels])
    n = len(true_scores)
    check_calibration_size(level, n)
    return ConformalFit(float(true_scores[math.ceil((n + 1) * level) - 1]), method, n)


def prediction_sets(probs: np.ndarray, threshold: float, method: str, decided: np.ndarray | None = None) -> np.ndarray:
    """Boolean ``N x C`` membership: class ``k`` is in image ``i``'s set. The decided label (default: the most
    probable class; with an operating point, the thresholded one) always is."""
    probs = np.asarray(probs)
    members = scores(probs, method) <= threshold + 1e-12  # the fitted threshold is itself one of the scores
    members[np.arange(len(probs)), probs.argmax(axis=1) if decided is None else decided] = True
    return members


def set_summary(members: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Coverage (the true class in the set), mean set size and the share of single-class sets."""
    sizes = members.sum(axis=1)
    return {"coverage": float(members[np.arange(len(labels)), labels].mean()) if len(labels) else math.nan,
            "mean_size": float(sizes.mean()) if len(sizes) else math.nan,
            "singletons": float((sizes == 1).mean()) if len(sizes) else math.nan}


def cross_fold_sets(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, level: float,
                    method: str | None = None) -> np.ndarray:
    """Out-of-fold prediction sets (``cv.folds`` with ``conformal=``): fold ``k``'s images get the sets of a threshold
    fitted on the other folds' out-of-fold probabilities. With folds grouped by patient, no patient is on both sides
    of a fit, so each fold is calibrated on patients it does not share, the per-patient exchangeability the guarantee
    needs. The other folds' probabilities come from other models than the one scoring fold ``k``, so this measures
    the recipe's sets (what a model trained this way would get), not one model's."""
    probs, labels, folds = np.asarray(probs), np.asarray(labels, dtype=np.int64), np.asarray(folds)
    members = np.zeros(probs.shape, dtype=bool)
    for k in np.unique(folds):
        rest = folds != k
        fit = fit_conformal(probs[rest], labels[rest], level, method)
        members[~rest] = prediction_sets(probs[~rest], fit.threshold, fit.method)
    return members
