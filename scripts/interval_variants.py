"""Candidate interval methods for a grouped accuracy, side by side (the table under "Intervals that cover?" in
docs/QUALITY.md).

    python scripts/interval_variants.py predictions=<run>/cv_predictions.csv [groups=../shared/data/MANIFEST.csv]
        [sizes=5,10,20] [draws=300] [seed=0]

Like ``interval_coverage.py`` (random test sets of ``size`` groups from out-of-fold predictions, the truth being the
accuracy on the other groups), for accuracy only: the shipped Dirichlet-process posterior (one unseen group, its rate
Beta(1/2, 1/2)), two other choices of its unseen group, the beta-binomial model over groups cellcls shipped before
2026-12-03 with three priors on its concentration, and the cluster ratio estimator with t.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from scipy.special import betaln, expit
from scipy.stats import t as student_t

import cellcls.scoring.intervals as iv
from interval_coverage import load


def ratio_t(k: np.ndarray, n: np.ndarray) -> tuple[float, float]:
    """The cluster ratio estimator's interval (linearised variance, t on groups - 1)."""
    g, r = len(n), k.sum() / n.sum()
    se = math.sqrt(np.sum((k - r * n) ** 2) / (g - 1) / n.mean() ** 2 / g)
    half = float(student_t.ppf(0.975, g - 1)) * se
    return max(0.0, r - half), min(1.0, r + half)


_MU = expit(np.linspace(-12.0, 12.0, 961))  # the population mean's grid, dense near 0 and 1
_EDGES = np.concatenate([[0.0], (_MU[1:] + _MU[:-1]) / 2, [1.0]])
_KAPPA = np.exp(np.linspace(math.log(0.1), math.log(1e4), 71))  # the concentration's grid


def with_prior(power: float):
    """The beta-binomial model over groups (each group's rate ~ Beta(mu kappa, (1 - mu) kappa), uniform prior on
    mu), with a prior proportional to kappa**power; on a grid."""

    def interval(k: np.ndarray, n: np.ndarray) -> tuple[float, float]:
        pairs, weight = np.unique(np.stack([k, n], 1), axis=0, return_counts=True)
        a, b = _MU[:, None] * _KAPPA[None, :], (1 - _MU)[:, None] * _KAPPA[None, :]
        ll = -betaln(a, b) * weight.sum()
        ll = ll + (betaln(pairs[:, 0] + a[..., None], pairs[:, 1] - pairs[:, 0] + b[..., None]) * weight).sum(-1)
        lp = ll + np.log(_MU * (1 - _MU))[:, None] + power * np.log(_KAPPA)[None, :]
        post = np.exp(lp - lp.max()).sum(1)
        cdf = np.concatenate([[0.0], np.cumsum(post / post.sum())])
        lo, hi = float(np.interp(0.025, cdf, _EDGES)), float(np.interp(0.975, cdf, _EDGES))
        pooled = k.sum() / n.sum()
        return min(lo, pooled), max(hi, pooled)

    return interval


def unseen_group(concentration: float, rate: tuple[float, float]):
    """The shipped Dirichlet-process interval with another weight or rate prior for its unseen group."""

    def interval(k: np.ndarray, n: np.ndarray) -> tuple[float, float]:
        draws = iv.rate_draws(k, n, unseen=concentration, unseen_rate=rate)
        return iv._equal_tailed(draws, iv.LEVEL, float(k.sum() / n.sum()))

    return interval


METHODS = {"Dirichlet process, 1 unseen group, rate Beta(1/2, 1/2) (shipped)": iv.proportion_interval,
           "Dirichlet process, 1 unseen group, rate uniform": unseen_group(1.0, (1.0, 1.0)),
           "Dirichlet process, 2 unseen groups, rate uniform (Bayes-Laplace with one image a group)":
               unseen_group(2.0, (1.0, 1.0)),
           "beta-binomial, log-uniform concentration (shipped until 2026-12-03)": with_prior(0.0),
           "beta-binomial, concentration^-0.5": with_prior(-0.5),
           "beta-binomial, BDA's (a+b)^-5/2": with_prior(-1.5),
           "cluster ratio estimator, t": ratio_t}


def main(argv: list[str]) -> None:
    own = {"groups": "../shared/data/MANIFEST.csv", "sizes": "5,10,20", "draws": "300", "seed": "0"}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in (*own, "predictions"):
            sys.exit(f"unknown argument {arg!r}")
        own[key] = value
    y, probs, groups, _ = load(Path(own["predictions"]), Path(own["groups"]))
    correct = probs.argmax(1) == y
    names = np.unique(groups)
    rng = np.random.default_rng(int(own["seed"]))
    draws = int(own["draws"])
    print("| method | groups | coverage | truth below / above | mean width |\n|---|---|---|---|---|")
    for size in (int(s) for s in own["sizes"].split(",")):
        tally = {m: [0, 0, 0, []] for m in METHODS}
        for _ in range(draws):
            test = np.isin(groups, rng.choice(names, size, replace=False))
            truth = correct[~test].mean()
            k, n = iv.group_counts(np.ones(test.sum(), bool), correct[test], list(groups[test]))
            for name, method in METHODS.items():
                lo, hi = method(k, n)
                t = tally[name]
                t[0] += lo <= truth <= hi
                t[1] += truth < lo
                t[2] += truth > hi
                t[3].append(hi - lo)
        for name, (hit, below, above, widths) in tally.items():
            print(f"| {name} | {size} | {hit / draws:.3f} | {below} / {above} | {np.mean(widths):.3f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
