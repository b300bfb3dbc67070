"""Each metric against a hand-computed case; bootstrap intervals behave as intervals."""

from __future__ import annotations

import numpy as np
import pytest

from cellcls.scoring.metrics import (
    bootstrap_ci,
    evaluate_predictions,
    headline_metrics,
    wilson_interval,
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


def test_the_bootstrap_resamples_patients_when_groups_are_known_and_is_wider():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(12)], 20)  # 12 patients, 20 cells each
    patient_ok = rng.random(12) < 0.7  # a patient's cells are all right or all wrong
    y = rng.integers(0, 2, len(groups))
    pred = np.where(np.repeat(patient_ok, 20), y, 1 - y)
    probs = np.stack([1 - pred, pred], axis=1).astype(float) * 0.8 + 0.1
    by_image = evaluate_predictions(y, probs, ["neg", "pos"], n_boot=300, interval="bootstrap")
    by_patient = evaluate_predictions(y, probs, ["neg", "pos"], n_boot=300, groups=list(groups), interval="bootstrap")
    width = lambda r: r["accuracy"]["ci95"][1] - r["accuracy"]["ci95"][0]  # noqa: E731
    assert width(by_patient) > 2 * width(by_image)
    assert by_patient["interval"] == {"level": 0.95, "method": "percentile bootstrap over 12 groups", "resamples": 300,
                                      "images": 240, "groups": 12}


def test_under_the_bootstrap_a_perfect_proportion_gets_a_wilson_interval_not_a_collapsed_one():
    y = np.array([1] * 60 + [0] * 40)
    probs = np.array([[0.1, 0.9]] * 60 + [[0.6, 0.4]] * 30 + [[0.4, 0.6]] * 10)
    r = evaluate_predictions(y, probs, ["neg", "pos"], n_boot=100, interval="bootstrap")
    assert r["sensitivity"]["value"] == 1.0 and r["sensitivity"]["method"] == "Wilson (images: 60)"
    lo, hi = r["sensitivity"]["ci95"]
    assert hi == 1.0 and 0.93 < lo < 0.95  # Wilson's 60/60: [0.940, 1.000], not [1.000, 1.000]
    assert "method" not in r["specificity"]  # 30/40: the bootstrap


def test_under_the_bootstrap_a_perfect_balanced_accuracy_gets_the_mean_of_per_class_wilson_intervals():
    y = np.array([1] * 60 + [0] * 40)
    probs = np.array([[0.1, 0.9]] * 60 + [[0.9, 0.1]] * 40)
    r = evaluate_predictions(y, probs, ["neg", "pos"], n_boot=100, interval="bootstrap")
    expected = np.mean([wilson_interval(40, 40), wilson_interval(60, 60)], axis=0)
    assert r["balanced_accuracy"]["ci95"] == pytest.approx(list(expected))
    assert r["balanced_accuracy"]["ci95"][0] < 0.95
    assert r["balanced_accuracy"]["method"] == "mean of per-class Wilson intervals (images: 40/60)"
