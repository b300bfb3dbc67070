"""Each metric against a hand-computed case; bootstrap intervals behave as intervals."""

from __future__ import annotations

import numpy as np
import pytest

from cellcls.evaluation.metrics import (
    bootstrap_ci,
    evaluate_predictions,
    headline_metrics,
)

# five cases: true 0,0,1,1,1 with P(class 1) = .1 .6 .8 .4 .9  ->  predicted 0,1,1,0,1
Y = [0, 0, 1, 1, 1]
P1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9])
PROBS = np.stack([1 - P1, P1], axis=1)


def value(result, key):
    return result[key]["value"]


def test_binary_metrics_match_the_hand_computed_case():
    r = evaluate_predictions(Y, PROBS, ["neg", "pos"], n_boot=50)
    assert value(r, "accuracy") == pytest.approx(3 / 5)
    assert value(r, "sensitivity") == pytest.approx(2 / 3)
    assert value(r, "specificity") == pytest.approx(1 / 2)
    assert value(r, "balanced_accuracy") == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert value(r, "roc_auc") == pytest.approx(5 / 6)  # 5 of the 6 (positive, negative) pairs ordered right
    assert r["confusion_matrix"] == [[1, 1], [1, 2]]
    assert r["per_class"]["neg"]["precision"] == pytest.approx(1 / 2)
    assert r["per_class"]["pos"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["pos"]["recall"] == pytest.approx(2 / 3)
    assert r["per_class"]["pos"]["f1-score"] == pytest.approx(2 / 3)
    assert r["per_class"]["neg"]["support"] == 2


def test_a_threshold_moves_the_binary_decision():
    r = evaluate_predictions(Y, PROBS, ["neg", "pos"], threshold=0.7, n_boot=50)
    assert r["confusion_matrix"] == [[2, 0], [1, 2]]
    assert value(r, "specificity") == 1.0 and value(r, "sensitivity") == pytest.approx(2 / 3)
    assert value(r, "roc_auc") == pytest.approx(5 / 6)  # ranking, not the threshold
    assert r["threshold"] == 0.7


def test_multiclass_auc_is_the_one_vs_rest_macro_average():
    y = [0, 1, 2, 2]
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    r = evaluate_predictions(y, probs, ["a", "b", "c"], n_boot=50)
    # class a: its case scores .7 above all others -> 1; class b: .5 vs .2, .6, .2 -> 2/3; class c: cases .3, .6
    # vs negatives .1, .3 -> (1 + .5) + (1 + 1) = 3.5 of 4
    assert value(r, "roc_auc") == pytest.approx((1 + 2 / 3 + 3.5 / 4) / 3)
    assert value(r, "accuracy") == pytest.approx(3 / 4)
    assert "sensitivity" not in r


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_cases():
    rng = np.random.default_rng(0)
    metric = headline_metrics(2)["accuracy"]

    def interval(n):
        y = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.8, y, 1 - y)
        probs = np.stack([1 - pred, pred], axis=1).astype(float)
        lo, hi = bootstrap_ci(y, pred, probs, metric, n_boot=500)
        return lo, metric(y, pred, probs), hi

    lo_s, est_s, hi_s = interval(60)
    lo_l, est_l, hi_l = interval(3000)
    assert lo_s <= est_s <= hi_s and lo_l <= est_l <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3


def test_bootstrap_is_seeded():
    metric = headline_metrics(2)["accuracy"]
    y, pred = np.array(Y), (P1 >= 0.5).astype(int)
    assert bootstrap_ci(y, pred, PROBS, metric, seed=3) == bootstrap_ci(y, pred, PROBS, metric, seed=3)


def test_auc_of_a_sample_with_one_class_is_undefined_not_an_error():
    r = evaluate_predictions([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["neg", "pos"], n_boot=20)
    assert np.isnan(value(r, "roc_auc"))
