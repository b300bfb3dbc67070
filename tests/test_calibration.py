"""Calibration measures, temperature scaling, operating points and per-patient results."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import TINY, train_in_process
from sklearn.metrics import brier_score_loss

from cellcls.infra.checkpoint import load_checkpoint
from cellcls.errors import ConfigError, DataError
from cellcls.scoring.calibration import (
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    parse_operating_point,
)
from cellcls.evaluation.patients import aggregate
from cellcls.scoring.heads import Decision


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    # 4 images at confidence 0.9 of which 2 are right (gap 0.4), 4 at 0.6 all right (gap 0.4): ECE 0.4
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    y = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    assert expected_calibration_error(y, probs) == pytest.approx(0.4)


def test_a_perfectly_calibrated_sample_has_an_ece_near_zero():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 200_000)
    y = (rng.uniform(size=p.size) >= p).astype(int)  # class 0 with probability p
    assert expected_calibration_error(y, np.stack([p, 1 - p], 1)) < 0.01


def test_brier_score_for_two_classes_is_twice_sklearns_positive_class_score():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=50)
    y = (rng.uniform(size=50) < 0.5).astype(int)
    assert brier_score(y, np.stack([1 - p, p], 1)) == pytest.approx(2 * brier_score_loss(y, p))


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    torch.manual_seed(0)
    logits = torch.randn(20_000, 3) * 4
    labels = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_temperature_scaling_leaves_the_predicted_class_unchanged():
    logits = torch.randn(100, 4)
    hot = Decision(temperature=3.0).probabilities(logits)
    assert torch.equal(hot.argmax(1), logits.argmax(1))


@pytest.mark.parametrize(("kind", "level"), [("sensitivity", 0.95), ("sensitivity", 0.8), ("specificity", 0.9)])
def test_the_operating_point_reaches_its_target_on_the_data_it_was_chosen_on(kind, level):
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 100)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t = choose_threshold(y, p, kind, level)
    predicted = (p >= t).astype(int)
    reached = (predicted[y == 1] == 1).mean() if kind == "sensitivity" else (predicted[y == 0] == 0).mean()
    assert reached >= level
    # and no stricter threshold would do: one step further gives the target up
    nudged = (p >= (np.nextafter(t, 2) if kind == "sensitivity" else np.nextafter(t, -1))).astype(int)
    worse = (nudged[y == 1] == 1).mean() if kind == "sensitivity" else (nudged[y == 0] == 0).mean()
    assert worse < level


@pytest.mark.parametrize("text", ["sensitivity", "recall:0.9", "sensitivity:1.5", "specificity:abc"])
def test_a_malformed_operating_point_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="expected sensitivity:<level> or specificity:<level>"):
        parse_operating_point(text)


def test_an_operating_point_needs_both_classes():
    with pytest.raises(DataError, match="both classes"):
        choose_threshold(np.ones(5, int), np.linspace(0, 1, 5), "sensitivity", 0.9)


def test_a_patient_is_positive_when_any_image_is_and_scored_by_its_most_suspicious_image():
    y = np.array([0, 1, 0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.95, 0.05]])
    names, truth, scores, counts = aggregate(y, probs, ["A", "A", "A", "B", "B"])
    assert names == ["A", "B"] and truth.tolist() == [1, 0] and counts.tolist() == [3, 2]
    assert scores[:, 1].tolist() == pytest.approx([0.8, 0.4])


def test_with_several_classes_a_patient_gets_the_soft_vote_of_their_images():
    y = np.array([2, 2, 1])
    probs = np.array([[0.1, 0.2, 0.7], [0.1, 0.5, 0.4], [0.2, 0.6, 0.2]])
    _, truth, scores, _ = aggregate(y, probs, ["P", "P", "P"])
    assert truth.tolist() == [2] and scores[0] == pytest.approx(probs.mean(0))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, cache_root):
    run = tmp_path_factory.mktemp("calibrated") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        train_in_process(run, "trainer.max_epochs=2", "logger=csv", "calibrate=true",
                         "operating_point=sensitivity:0.95", "conformal=0.9", *TINY)
    return run


def test_training_with_calibrate_stores_the_fitted_rule_in_best_pt(calibrated_run):
    stored = load_checkpoint(calibrated_run, "best.pt").calibration
    assert stored["temperature"] > 0 and stored["temperature"] != 1.0
    assert 0 < stored["threshold"] < 1 and stored["operating_point"] == "sensitivity:0.95"
    assert re.fullmatch(r"val \(\d+ images\)", stored["fitted_on"])


def test_training_with_conformal_stores_the_set_rule_and_reports_the_test_sets(calibrated_run):
    stored = load_checkpoint(calibrated_run, "best.pt").calibration
    assert stored["set_level"] == 0.9 and stored["set_method"] == "lac" and stored["set_threshold"] is not None
    sets = json.loads((calibrated_run / "test_metrics.json").read_text())["prediction_sets"]
    assert sets["level"] == 0.9 and 0 <= sets["coverage"] <= 1 and 1 <= sets["mean_size"] <= 2


def test_a_conformal_level_the_validation_split_cannot_reach_is_refused_before_the_first_epoch(tmp_path):
    with pytest.raises(ConfigError, match=r"conformal=0.99 needs at least 99 calibration images; the validation "
                                          r"split has \d+"):
        train_in_process(tmp_path / "run", "trainer.max_epochs=1", "logger=csv", "conformal=0.99", *TINY)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_the_operating_point_is_reported_on_test(calibrated_run):
    test = json.loads((calibrated_run / "test_metrics.json").read_text())
    op = test["operating_point"]
    assert op["threshold"] == test["decision"]["threshold"]
    assert 0 <= op["sensitivity"] <= 1 and 0 <= op["specificity"] <= 1 and "ece" in test and "brier" in test


def test_evaluate_predict_and_export_use_the_stored_temperature_and_threshold(calibrated_run, tmp_path):
    from cellcls.data.datamodule import resolve_root
    from cellcls.deploy.export import export_model, max_difference
    from cellcls.deploy.predict import predict_files
    from cellcls.deploy.runtimes import load_exported
    from cellcls.evaluation.evaluate import evaluate
    from cellcls.models.trained import load_model

    loaded = load_model(calibrated_run, "cpu")
    result, out = evaluate(calibrated_run, n_boot=50, make_plots=False, output=tmp_path / "eval")
    assert result["threshold"] == loaded.threshold
    assert result["calibration"]["temperature"] == loaded.decision.temperature
    assert "uncalibrated" in result["calibration"]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    positive = result["classes"][1]
    assert all((r["predicted"] == positive) == (float(r[f"p_{positive}"]) >= loaded.threshold) for r in rows)
    exported = export_model(loaded, "onnx", tmp_path / "model.onnx")
    assert max_difference(loaded, exported) < 1e-4  # the temperature is inside the graph
    assert load_exported(exported).threshold == loaded.threshold
    root = resolve_root(loaded.config.dataset)
    predictions, _ = predict_files(loaded, [root / r["file"] for r in rows[:24]])
    assert [p.label(result["classes"]) for p in predictions] == [r["predicted"] for r in rows[:24]]


def test_evaluate_reports_calibration_and_draws_the_reliability_diagram(trained_run, tmp_path):
    from PIL import Image

    from cellcls.evaluation.evaluate import evaluate

    result, out = evaluate(trained_run, n_boot=50, output=tmp_path / "eval")
    cal = result["calibration"]
    assert 0 <= cal["ece"] <= 1 and 0 <= cal["brier"] <= 2 and cal["temperature"] == 1.0
    assert sum(b["count"] for b in cal["bins"]) == result["num_images"]
    with Image.open(out / "reliability.png") as im:
        assert im.format == "PNG" and im.size == (550, 600)
    assert "Calibration: ECE" in (out / "report.md").read_text()


def test_per_patient_results_on_malaria_have_one_row_per_test_patient(malaria_run, tmp_path):
    from cellcls.evaluation.evaluate import evaluate

    result, out = evaluate(malaria_run, n_boot=50, make_plots=False, output=tmp_path / "eval", group_by="patient")
    listed = (malaria_run / "splits" / "test.csv").read_text().splitlines()[1:]
    patients = {re.match(r"^(C\d+)", line.rsplit("/", 1)[-1]).group(1) for line in listed}
    with open(out / "patients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["patient"] for r in rows} == patients and sum(int(r["images"]) for r in rows) == len(listed)
    per_patient = result["per_patient"]
    assert per_patient["num_images"] == len(patients) and per_patient["rule"] == "max"
    assert "## Per patient" in (out / "report.md").read_text()


def test_per_patient_results_need_to_know_each_images_patient(trained_run, tmp_path):
    from cellcls.evaluation.evaluate import evaluate

    with pytest.raises(ConfigError, match="group_by=patient needs each image's patient: dataset.group_pattern .*dataset.table.group"):
        evaluate(trained_run, n_boot=10, make_plots=False, output=tmp_path / "e", group_by="patient")
