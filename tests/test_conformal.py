"""Conformal prediction sets: the coverage guarantee, the set rules, and the stored rule used by evaluate, predict,
the Python API, serve and exports on real malaria cells."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cellcls.errors import ConfigError
from cellcls.scoring.conformal import (
    check_calibration_size,
    fit_conformal,
    prediction_sets,
    scores,
    set_summary,
)


def _exchangeable(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a model that is right about its own uncertainty: labels drawn from them."""
    logits = rng.normal(0, 2.0, (n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = (rng.random((n, 1)) > probs.cumsum(1)).sum(1).clip(max=classes - 1)
    return probs, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_sets_fitted_on_one_sample_cover_new_images_at_the_level_asked(classes):
    # the guarantee: coverage >= level on average over calibration draws (exactly k / (n + 1) = 0.9 here for a
    # continuous score; the non-randomised APS and the always-included top class add a little). 1000 draws: the
    # mean's standard error is about 0.001
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(1000):
        cal_p, cal_y = _exchangeable(rng, 99, classes)
        new_p, new_y = _exchangeable(rng, 400, classes)
        fit = fit_conformal(cal_p, cal_y, 0.9)
        covered.append(set_summary(prediction_sets(new_p, fit.threshold, fit.method), new_y)["coverage"])
    assert 0.9 - 0.004 <= np.mean(covered) <= (0.935 if classes > 2 else 0.904), np.mean(covered)


def test_two_classes_use_the_smallest_sets_and_more_classes_adaptive_ones():
    rng = np.random.default_rng(1)
    p2, y2 = _exchangeable(rng, 200, 2)
    p4, y4 = _exchangeable(rng, 200, 4)
    assert fit_conformal(p2, y2, 0.9).method == "lac" and fit_conformal(p4, y4, 0.9).method == "aps"
    # APS: a class's score is the mass of the classes ranked at or above it
    np.testing.assert_allclose(scores(np.array([[0.5, 0.2, 0.3]]), "aps"), [[0.5, 1.0, 0.8]])
    np.testing.assert_allclose(scores(np.array([[0.7, 0.3]]), "lac"), [[0.3, 0.7]])


def test_a_sure_image_gets_one_class_and_an_unsure_one_both():
    members = prediction_sets(np.array([[0.98, 0.02], [0.55, 0.45], [0.01, 0.99]]), threshold=0.6, method="lac")
    assert members.tolist() == [[True, False], [True, True], [False, True]]


def test_the_decided_class_is_always_in_the_set_even_below_the_threshold():
    members = prediction_sets(np.array([[0.3, 0.3, 0.4]]), threshold=0.1, method="aps")
    assert members.tolist() == [[False, False, True]]
    # with an operating point the decided label may not be the most probable class
    assert prediction_sets(np.array([[0.6, 0.4]]), 0.1, "lac", decided=np.array([1])).tolist() == [[False, True]]


def test_a_level_the_validation_split_is_too_small_for_is_refused_with_the_size_needed():
    with pytest.raises(ConfigError, match=r"conformal=0.95 needs at least 19 calibration images; the validation "
                                          r"split has 12\. Choose a lower level"):
        check_calibration_size(0.95, 12)
    check_calibration_size(0.95, 19)


def test_a_level_outside_zero_and_one_names_the_setting(tmp_path):
    from conftest import compose_config

    from cellcls.training.validate import validate

    with pytest.raises(ConfigError, match=r"conformal=1.5 is not valid; expected the coverage"):
        validate(compose_config("conformal=1.5"))


@pytest.fixture(scope="module")
def conformal_run(malaria_run, tmp_path_factory):
    """A copy of the real malaria run with prediction sets fitted on its validation cells by the calibrate command."""
    from conftest import calibrated_copy

    return calibrated_copy(malaria_run, tmp_path_factory.mktemp("conformal"), "conformal=0.9")


def test_calibrate_stores_the_set_rule_in_best_pt_and_keeps_the_weights(conformal_run, malaria_run):
    from cellcls.infra.checkpoint import load_checkpoint

    after, before = load_checkpoint(conformal_run, "best.pt"), load_checkpoint(malaria_run, "best.pt")
    stored = after.calibration
    assert stored["set_level"] == 0.9 and stored["set_method"] == "lac" and 0 < stored["set_threshold"] < 1
    assert all(np.array_equal(after.model[k].numpy(), before.model[k].numpy()) for k in before.model)


def test_evaluate_reports_the_sets_coverage_with_a_grouped_interval_and_per_class(conformal_run, tmp_path):
    from cellcls.evaluation.evaluate import evaluate

    result, out = evaluate(conformal_run, n_boot=200, make_plots=False, output=tmp_path / "eval")
    sets = result["prediction_sets"]
    lo, hi = sets["coverage"]["ci95"]
    assert sets["level"] == 0.9 and lo <= sets["coverage"]["value"] <= hi
    assert 1.0 <= sets["mean_size"] <= 2.0 and 0.0 <= sets["singletons"] <= 1.0
    assert set(sets["per_class"]) == {"Parasitized", "Uninfected"}
    assert sum(r["images"] for r in sets["per_class"].values()) == result["num_images"]
    # coverage is at least the accuracy: a set holds the predicted class and sometimes the other one too
    assert sets["coverage"]["value"] >= result["accuracy"]["value"]
    assert "## Prediction sets (conformal, aiming at coverage 0.9)" in (out / "report.md").read_text()


def test_predict_prints_each_images_set_and_writes_it_to_the_csv(conformal_run, tmp_path, capsys):
    from conftest import real_dataset

    from cellcls.predict import main

    folder = real_dataset("malaria") / "cell_images" / "Parasitized"
    out = tmp_path / "p.csv"
    assert main([f"checkpoint={conformal_run}", f"input={folder}", f"output={out}", "device=cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": " in line and "%" in line]
    assert lines and all(" set {" in line and line.count("at 90%") == 1 for line in lines)
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["predicted"] in r["set"].split("|") for r in rows)
    both = [r for r in rows if r["set"] == "Parasitized|Uninfected"]
    assert all("cannot tell" in line for line in lines if "{Parasitized, Uninfected}" in line) and len(lines) == len(rows)
    assert len(both) < len(rows)  # most cells get one class


def test_the_api_the_server_and_an_onnx_export_give_the_checkpoints_sets(conformal_run, tmp_path):
    from conftest import real_dataset

    import cellcls
    from cellcls.deploy.export import export_model
    from cellcls.models.trained import load_model

    files = sorted((real_dataset("malaria") / "cell_images" / "Uninfected").glob("*.png"))[:16]
    sets = cellcls.load(conformal_run, "cpu").predict_set(files)
    assert len(sets) == 16 and all(s and set(s) <= {"Parasitized", "Uninfected"} for s in sets)
    exported = export_model(load_model(conformal_run, "cpu"), "onnx", tmp_path / "model.onnx")
    assert cellcls.load(exported, "cpu").predict_set(files) == sets
    card = json.loads(json.dumps(cellcls.load(exported, "cpu").card))  # the card is plain JSON, sets rule included
    assert card["decision"]["set_level"] == 0.9
    from conftest import Server
    from test_serve import call, upload

    srv = Server(f"checkpoint={exported}", cwd=tmp_path)
    try:
        status, out = call(srv.url + "api/predict", {"images": [upload(p.name, p.read_bytes()) for p in files[:8]]})
    finally:
        srv.stop()
    assert status == 200
    for result, expected in zip(out["results"], sets):
        assert result["prediction_set"] == {"classes": expected, "level": 0.9}
        assert result["uncertain"] or len(expected) == 1


def test_the_api_says_how_to_get_sets_from_a_model_without_a_set_rule(malaria_run):
    import cellcls

    with pytest.raises(ValueError, match="has no prediction-set rule; train it with conformal=0.95"):
        cellcls.load(malaria_run, "cpu").predict_set(np.zeros((1, 3, 64, 64), np.uint8))
