"""95% intervals for a test set whose images come in groups (patients, or the smear photo a cell was cut from).

Images of one patient are not independent, and a small test set holds few patients, most of them often classified
perfectly while the errors sit in a few others. A percentile bootstrap over those patients cannot show an error rate
it never saw: measured on out-of-fold malaria predictions, its nominal 95% covered 0.60-0.84 (docs/QUALITY.md,
"Intervals that cover?"). The methods here allow for patients unlike the ones seen:

- a proportion (accuracy, sensitivity, specificity, prediction-set coverage): the posterior of the image-weighted
  rate over the population of groups under a Dirichlet-process prior (Ferguson 1973): the groups seen, each with
  weight Dirichlet(1), plus one unseen group (concentration 1) of average size whose rate is drawn from
  Beta(1/2, 1/2). The unseen group is what leaves room for a patient worse (or better) than any seen. With one image
  per group it is exactly the Jeffreys interval of a binomial proportion, the one Brown, Cai & DasGupta (2001)
  recommend for its coverage. Sampled (seeded, so reports are reproducible); groups with the same counts are merged
  (the Dirichlet's aggregation property), so thousands of images cost no more than a few.
- balanced accuracy: the mean of the per-class recall posteriors, sampled independently (weighing each patient once
  for all classes was tried and covered no better on the malaria and pneumonia simulations: docs/QUALITY.md).
- ROC-AUC: the delete-one-group jackknife's standard error on the logit scale with Student's t on ``groups - 1``
  degrees of freedom, the small-sample cluster rule; it cannot see unseen bad patients, and with nearly every pair
  ordered it sees no spread (measured). For two classes the interval is therefore never narrower than the proportion
  interval of the AUC read as a rate over the rarer class: each of its images scores its placement (the share of the
  other class it outranks; their mean is the AUC), grouped like any proportion (DeLong's placement values).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import expit, logit
from scipy.stats import t as student_t

LEVEL = 0.95
RATE_METHOD = "Dirichlet-process posterior"  # how a proportion's interval is named in reports
UNSEEN_GROUPS = 1.0  # the Dirichlet process's concentration: the weight of the unseen group, in groups
UNSEEN_RATE = (0.5, 0.5)  # its rate's Beta prior (Jeffreys)
DRAWS = 20000


def group_counts(cases: np.ndarray, hits: np.ndarray, groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per group: how many of ``cases`` it holds and how many of those are ``hits`` (images are groups when
    ``groups`` is None)."""
    cases = np.asarray(cases, bool)
    k, n = _group_sums(cases, (np.asarray(hits, bool) & cases)[cases], groups)
    return k.astype(int), n


def _group_sums(cases: np.ndarray, values: np.ndarray, groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per group holding ``cases``: the sum of ``values`` (one per case) and how many cases."""
    if groups is None:
        return values, np.ones(len(values), int)
    _, codes = np.unique(np.asarray(groups)[cases], return_inverse=True)
    return np.bincount(codes, weights=values), np.bincount(codes).astype(int)


def rate_draws(successes: np.ndarray, trials: np.ndarray, seed: int = 0, draws: int = DRAWS,
               unseen: float = UNSEEN_GROUPS, unseen_rate: tuple[float, float] = UNSEEN_RATE) -> np.ndarray:
    """Draws from the posterior of the population's image-weighted rate (successes / trials over all its groups);
    ``unseen`` and ``unseen_rate`` are the unseen group's weight and rate prior (scripts compare other choices)."""
    successes, trials = np.asarray(successes, float), np.asarray(trials, float)
    pairs, alike = np.unique(np.stack([successes, trials], 1), axis=0, return_counts=True)
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.concatenate([alike.astype(float), [unseen]]), draws)
    size = trials.mean()  # the unseen group: an average one
    unseen_hits = rng.beta(*unseen_rate, draws) * size
    hits = weights[:, :-1] @ pairs[:, 0] + weights[:, -1] * unseen_hits
    images = weights[:, :-1] @ pairs[:, 1] + weights[:, -1] * size
    return hits / images


def _equal_tailed(draws: np.ndarray, level: float, pooled: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    # the interval always holds the observed rate (Monte-Carlo noise must not put it outside)
    return float(min(lo, pooled)), float(max(hi, pooled))


def proportion_interval(successes: np.ndarray, trials: np.ndarray, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float]:
    """Equal-tailed credible interval of the population rate from per-group ``successes`` of ``trials``; it always
    holds the pooled rate."""
    if len(trials) == 0 or np.sum(trials) == 0:
        return math.nan, math.nan
    return _equal_tailed(rate_draws(successes, trials, seed), level, float(np.sum(successes) / np.sum(trials)))


def mean_of_proportions_interval(counts: Sequence[tuple[np.ndarray, np.ndarray]], level: float = LEVEL,
                                 seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of several population rates (balanced accuracy: the mean of per-class recalls), their
    posteriors sampled independently."""
    mean = np.mean([rate_draws(k, n, seed + i) for i, (k, n) in enumerate(counts)], 0)
    return _equal_tailed(mean, level, float(np.mean([np.sum(k) / np.sum(n) for k, n in counts])))


def placement_counts(y_true: np.ndarray, score: np.ndarray,
                     groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per group of the rarer class: the sum of its images' placements (the share of the other class each outranks,
    ties a half) and how many images; summed over groups and divided, the two-class ROC-AUC."""
    y_true, score = np.asarray(y_true), np.asarray(score, float)
    rarer = 1 if (y_true == 1).sum() <= (y_true == 0).sum() else 0
    sign = 1.0 if rarer == 1 else -1.0  # class 1 should outrank class 0
    mine, other = sign * score[y_true == rarer], sign * score[y_true != rarer]
    placement = ((mine[:, None] > other[None, :]).sum(1) + 0.5 * (mine[:, None] == other[None, :]).sum(1)) / len(other)
    return _group_sums(y_true == rarer, placement, groups)


def jackknife_logit_interval(statistic: Callable[[np.ndarray], float], groups: Sequence[str] | None, n: int,
                             level: float = LEVEL) -> tuple[float, float]:
    """Interval of a statistic in (0, 1) from its delete-one-group jackknife on the logit scale, Student's t with
    ``groups - 1`` degrees of freedom; ``statistic`` takes the indices of the images kept. NaN with fewer than 3
    usable groups."""
    codes = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    everything = np.arange(n)
    value = statistic(everything)
    if not 0 < value < 1:
        return math.nan, math.nan
    eps = 0.5 / n  # a leave-one-out value of exactly 1 (or 0) is clipped, not dropped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        leave_out = np.array([statistic(everything[codes != g]) for g in range(codes.max() + 1)])
    leave_out = logit(np.clip(leave_out[~np.isnan(leave_out)], eps, 1 - eps))
    g = len(leave_out)
    if g < 3:
        return math.nan, math.nan
    se = math.sqrt((g - 1) / g * np.sum((leave_out - leave_out.mean()) ** 2))
    half = float(student_t.ppf(0.5 + level / 2, g - 1)) * se
    centre = float(logit(value))
    return float(expit(centre - half)), float(expit(centre + half))
