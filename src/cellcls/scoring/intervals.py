"""95% intervals for a test set whose images come in groups (patients, or the smear photo a cell was cut from).

Images of one patient are not independent, and a small test set holds few patients, most of them often classified
perfectly while the errors sit in a few others. A percentile bootstrap over those patients cannot show an error rate
it never saw: measured on out-of-fold malaria predictions, its nominal 95% covered 0.60-0.84 (docs/QUALITY.md,
"Intervals that cover?"). The methods here allow for patients unlike the ones seen:

- a proportion (accuracy, sensitivity, specificity, prediction-set coverage): the posterior of the population mean
  ``mu`` of a beta-binomial model over groups (each patient's own rate ``theta_g ~ Beta(mu kappa, (1 - mu) kappa)``;
  uniform prior on ``mu``, log-uniform on the concentration ``kappa``; Gelman et al., *Bayesian Data Analysis*,
  ch. 5), computed on a grid. Small ``kappa`` is "patients differ a lot", so a few perfect patients leave room for
  bad ones; with one image per group it is the Bayes-Laplace interval of a binomial proportion.
- balanced accuracy: the mean of the per-class recall posteriors (sampled, seeded).
- ROC-AUC: the delete-one-group jackknife's standard error on the logit scale with Student's t on ``groups - 1``
  degrees of freedom, the small-sample cluster rule; it cannot see unseen bad patients either (measured).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import betaln, expit, logit
from scipy.stats import t as student_t

LEVEL = 0.95
_MU = expit(np.linspace(-12.0, 12.0, 961))  # dense near 0 and 1, where accuracies live
_EDGES = np.concatenate([[0.0], (_MU[1:] + _MU[:-1]) / 2, [1.0]])
_KAPPA = np.exp(np.linspace(math.log(0.1), math.log(1e4), 71))


def group_counts(cases: np.ndarray, hits: np.ndarray, groups: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per group: how many of ``cases`` it holds and how many of those are ``hits`` (images are groups when
    ``groups`` is None)."""
    cases = np.asarray(cases, bool)
    hits = np.asarray(hits, bool) & cases
    if groups is None:
        return hits[cases].astype(int), np.ones(int(cases.sum()), int)
    _, codes = np.unique(np.asarray(groups)[cases], return_inverse=True)
    return np.bincount(codes, weights=hits[cases]).astype(int), np.bincount(codes).astype(int)


def proportion_posterior(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """The posterior probability of each grid value of the population rate ``mu`` (sums to 1)."""
    pairs, weight = np.unique(np.stack([successes, trials], 1), axis=0, return_counts=True)
    a = _MU[:, None] * _KAPPA[None, :]
    b = (1 - _MU)[:, None] * _KAPPA[None, :]
    loglik = -betaln(a, b) * weight.sum()
    for start in range(0, len(pairs), 32):  # chunks keep the grid x groups array small
        k, n, w = pairs[start:start + 32, 0], pairs[start:start + 32, 1], weight[start:start + 32]
        loglik = loglik + (betaln(k + a[..., None], n - k + b[..., None]) * w).sum(-1)
    # uniform prior on mu over a logit grid: mu (1 - mu); log-uniform kappa: equal weight on the log grid
    logpost = loglik + np.log(_MU * (1 - _MU))[:, None]
    post = np.exp(logpost - logpost.max()).sum(1)
    return post / post.sum()


def _quantiles(post: np.ndarray, level: float) -> tuple[float, float]:
    # each grid value's mass spread over its cell (between the midpoints to its neighbours)
    cdf = np.concatenate([[0.0], np.cumsum(post)])
    alpha = (1 - level) / 2
    return float(np.interp(alpha, cdf, _EDGES)), float(np.interp(1 - alpha, cdf, _EDGES))


def proportion_interval(successes: np.ndarray, trials: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Equal-tailed credible interval of the population rate from per-group ``successes`` of ``trials``; it always
    holds the pooled rate (which weighs patients by their images, ``mu`` weighs them equally)."""
    if len(trials) == 0 or trials.sum() == 0:
        return math.nan, math.nan
    lo, hi = _quantiles(proportion_posterior(successes, trials), level)
    pooled = float(successes.sum() / trials.sum())
    return min(lo, pooled), max(hi, pooled)


def mean_of_proportions_interval(counts: Sequence[tuple[np.ndarray, np.ndarray]], level: float = LEVEL,
                                 seed: int = 0, draws: int = 20000) -> tuple[float, float]:
    """Interval of the mean of several population rates (balanced accuracy: the mean of per-class recalls), their
    posteriors sampled independently."""
    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for successes, trials in counts:
        total += rng.choice(_MU, draws, p=proportion_posterior(successes, trials))
    mean = total / len(counts)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(mean, [alpha, 1 - alpha])
    pooled = np.mean([s.sum() / n.sum() for s, n in counts])
    return float(min(lo, pooled)), float(max(hi, pooled))


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
