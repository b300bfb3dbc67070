"""The grouped 95% intervals: they reduce to the textbook binomial case, widen for few patients, and cover where the
percentile bootstrap over patients does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from cellcls.scoring.intervals import (
    group_counts,
    jackknife_logit_interval,
    mean_of_proportions_interval,
    placement_counts,
    proportion_interval,
)
from cellcls.scoring.metrics import bootstrap_ci, evaluate_predictions, roc_auc


def test_with_one_image_per_group_it_is_the_jeffreys_interval_of_a_proportion():
    lo, hi = proportion_interval(np.array([1] * 41 + [0] * 9), np.ones(50, int))
    assert lo == pytest.approx(beta.ppf(0.025, 41.5, 9.5), abs=3e-3)
    assert hi == pytest.approx(beta.ppf(0.975, 41.5, 9.5), abs=3e-3)


def test_thousands_of_independent_images_cost_no_more_than_a_few():
    hits = np.random.default_rng(0).random(20000) < 0.9
    lo, hi = proportion_interval(hits.astype(int), np.ones(20000, int))
    assert lo < hits.mean() < hi and hi - lo < 0.01


def test_a_few_bad_patients_among_many_perfect_ones_are_covered_at_5_10_and_20_patients():
    """The malaria subset's shape: 58 of 100 patients perfect, 37 at 0.88, 5 at 0.35, 9 cells each. The truth a
    small test set stands for is the accuracy on the other patients (the simulation of docs/QUALITY.md)."""
    rng = np.random.default_rng(2)
    rates = np.concatenate([np.ones(58), np.full(37, 0.88), np.full(5, 0.35)])
    correct = np.array([rng.random(9) < r for r in rates])
    for size in (5, 10, 20):
        hit = 0
        for _ in range(150):
            test = np.zeros(100, bool)
            test[rng.choice(100, size, replace=False)] = True
            lo, hi = proportion_interval(correct[test].sum(1), np.full(size, 9))
            hit += int(lo <= correct[~test].mean() <= hi)
        assert hit / 150 >= 0.9, (size, hit / 150)


def test_eleven_perfect_patients_leave_room_for_patients_worse_than_any_seen():
    patients = proportion_interval(np.full(11, 10), np.full(11, 10))  # 110 cells of 11 patients, all right
    images = proportion_interval(np.ones(110, int), np.ones(110, int))  # 110 independent cells, all right
    assert patients[1] == 1.0 and images[1] == 1.0
    assert images[0] > 0.96
    assert patients[0] < 0.9  # 0.908, what the README's model scored on 99 other patients, is inside


def test_many_alike_patients_give_nearly_the_binomial_interval():
    k = np.random.default_rng(0).binomial(9, 0.9, 100)  # 100 patients, one rate for all
    lo, hi = proportion_interval(k, np.full(100, 9))
    b_lo, b_hi = beta.ppf([0.025, 0.975], k.sum() + 1, 900 - k.sum() + 1)
    assert (hi - lo) < 1.5 * (b_hi - b_lo)
    assert lo < k.sum() / 900 < hi


def test_the_interval_always_holds_the_pooled_rate():
    # one large perfect patient and three small bad ones: the mean over patients is far below the pooled rate
    lo, hi = proportion_interval(np.array([200, 1, 1, 1]), np.array([200, 5, 5, 5]))
    assert lo <= 203 / 215 <= hi


def test_group_counts_sum_each_patients_cases_and_hits():
    hits, trials = group_counts(np.array([1, 1, 0, 1], bool), np.array([1, 0, 1, 1], bool), ["a", "a", "b", "b"])
    assert hits.tolist() == [1, 1] and trials.tolist() == [2, 1]
    hits, trials = group_counts(np.array([1, 1, 0], bool), np.array([1, 0, 1], bool), None)
    assert hits.tolist() == [1, 0] and trials.tolist() == [1, 1]


def test_few_heterogeneous_patients_are_covered_where_the_bootstrap_is_not():
    """A population whose patients differ (most near-perfect, a few bad, like the malaria subset's): draw 10 patients,
    and count how often each method's interval holds the population's accuracy."""
    rng = np.random.default_rng(1)
    truth = beta.mean(4.0, 0.4)  # population rate 0.909; patient rates Beta(4, 0.4)
    accuracy = lambda y, p, _: float(np.mean(y == p))  # noqa: E731  (sklearn's is slow for 16,000 resamples)
    hit = {"grouped": 0, "bootstrap": 0}
    draws = 80
    for draw in range(draws):
        sizes = rng.integers(5, 15, 10)
        correct = np.concatenate([rng.random(n) < r for n, r in zip(sizes, rng.beta(4.0, 0.4, 10))])
        groups = np.repeat(np.arange(10).astype(str), sizes).tolist()
        lo, hi = proportion_interval(*group_counts(np.ones(len(correct), bool), correct, groups))
        hit["grouped"] += int(lo <= truth <= hi)
        y = np.ones(len(correct), int)
        lo, hi = bootstrap_ci(y, correct.astype(int), np.zeros((len(y), 2)), accuracy, n_boot=200, seed=draw,
                              groups=groups)
        hit["bootstrap"] += int(lo <= truth <= hi)
    assert hit["grouped"] / draws >= 0.9
    assert hit["bootstrap"] / draws < hit["grouped"] / draws - 0.05


def test_balanced_accuracy_is_the_mean_of_the_per_class_posteriors():
    perfect = (np.full(5, 10), np.full(5, 10))
    half = (np.full(5, 5), np.full(5, 10))
    lo, hi = mean_of_proportions_interval([perfect, half])
    assert lo < 0.75 < hi
    assert mean_of_proportions_interval([perfect, half], seed=3) == mean_of_proportions_interval([perfect, half], seed=3)


def test_the_auc_jackknife_holds_the_estimate_and_widens_with_fewer_patients():
    rng = np.random.default_rng(0)

    def width(patients):
        groups = np.repeat(np.arange(patients), 12)
        y = rng.integers(0, 2, len(groups))
        p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, len(y)), 0.01, 0.99)
        probs = np.stack([1 - p, p], 1)
        value = roc_auc(y, probs)
        lo, hi = jackknife_logit_interval(lambda idx: roc_auc(y[idx], probs[idx]), groups.astype(str).tolist(), len(y))
        assert lo < value < hi
        return hi - lo

    assert width(6) > width(60)


def test_the_auc_jackknife_needs_three_patients():
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]])
    lo, hi = jackknife_logit_interval(lambda idx: roc_auc(y[idx], probs[idx]), ["a", "a", "b", "b"], 4)
    assert np.isnan(lo) and np.isnan(hi)


def test_evaluate_predictions_names_the_grouped_method_by_default():
    y = [0, 1, 0, 1, 1, 0]
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    r = evaluate_predictions(y, probs, ["neg", "pos"], groups=["a", "a", "b", "b", "c", "c"])
    assert r["interval"]["method"] == "Dirichlet-process posterior over 3 groups (ROC-AUC: the wider of a jackknife over 3 groups, logit, t, and its placement values)"
    assert "resamples" not in r["interval"]
    for key in ("accuracy", "sensitivity", "specificity", "balanced_accuracy"):
        lo, hi = r[key]["ci95"]
        assert lo <= r[key]["value"] <= hi
    with pytest.raises(ValueError, match="interval='wald'"):
        evaluate_predictions(y, probs, ["neg", "pos"], interval="wald")


def test_an_unknown_interval_method_is_refused_with_the_allowed_ones():
    from cellcls.errors import ConfigError
    from cellcls.scoring.metrics import IntervalRule

    with pytest.raises(ConfigError, match="interval='wald' is not valid; allowed values: grouped, bootstrap"):
        IntervalRule("wald")


def test_a_perfect_auc_gets_the_interval_of_a_perfect_proportion_over_the_rarer_class():
    y = np.array([0] * 30 + [1] * 10)
    probs = np.array([[0.9, 0.1]] * 30 + [[0.2, 0.8]] * 10)
    lo, hi = evaluate_predictions(y, probs, ["neg", "pos"])["roc_auc"]["ci95"]
    assert hi == 1.0 and lo == pytest.approx(proportion_interval(np.ones(10, int), np.ones(10, int))[0])
    assert lo < 0.85  # 10 positives cannot show an AUC of 1 to within a few points


def test_a_nearly_perfect_auc_on_few_images_is_as_wide_as_its_placements_allow():
    # 5 positives, 15 negatives, one pair misordered: the jackknife sees almost no spread
    y = np.array([1] * 5 + [0] * 15)
    score = np.concatenate([[0.9, 0.85, 0.8, 0.75, 0.425], np.linspace(0.05, 0.45, 15)])
    score[-1] = 0.43  # the one negative above the lowest positive
    probs = np.stack([1 - score, score], 1)
    lo, hi = evaluate_predictions(y, probs, ["neg", "pos"])["roc_auc"]["ci95"]
    jack = jackknife_logit_interval(lambda idx: roc_auc(y[idx], probs[idx]), None, len(y))
    placed = proportion_interval(*placement_counts(y, score, None))
    assert roc_auc(y, probs) == pytest.approx(74 / 75)
    assert lo == pytest.approx(min(jack[0], placed[0])) and lo < 0.8
    assert jack[0] > lo  # the jackknife alone would have been narrower
