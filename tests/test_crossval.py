"""Cross-validation: grouped stratified folds, out-of-fold predictions, the per-fold and pooled table, sweeps."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import TINY, compose_config, real_dataset, run_cli

from cellcls.data.samples import Samples
from cellcls.data.splits import cross_validation_fold
from cellcls.errors import ConfigError, DataError


def samples(n_per_class: int, per_group: int = 1) -> tuple[Samples, list[str]]:
    from pathlib import Path

    paths = [Path(f"img_{i}.png") for i in range(2 * n_per_class)]
    labels = [i % 2 for i in range(2 * n_per_class)]
    return Samples(paths, labels), [f"g{i // (2 * per_group)}" for i in range(2 * n_per_class)]


def test_every_image_is_tested_in_exactly_one_fold_and_no_group_is_split():
    data, groups = samples(30, per_group=3)
    held = []
    for k in range(5):
        rest, fold = cross_validation_fold(data, 5, k, seed=0, classes=["a", "b"], groups=groups)
        assert not set(rest.paths) & set(fold.paths) and len(rest) + len(fold) == len(data)
        fold_groups = {groups[data.paths.index(p)] for p in fold.paths}
        rest_groups = {groups[data.paths.index(p)] for p in rest.paths}
        assert not fold_groups & rest_groups
        assert set(fold.labels) == {0, 1}
        held += fold.paths
    assert sorted(map(str, held)) == sorted(map(str, data.paths))


def test_a_fold_without_one_class_is_a_clear_error():
    data, _ = samples(10)
    data = Samples(data.paths, [0] * 18 + [1] * 2)
    with pytest.raises(DataError, match=r"fold \d of 5 holds no image of class\(es\) \['b'\].*use fewer folds"):
        for k in range(5):
            cross_validation_fold(data, 5, k, seed=0, classes=["a", "b"])


def test_one_fold_or_a_fold_out_of_range_is_refused():
    from cellcls.training.validate import validate

    with pytest.raises(ConfigError, match="cv.folds=1: use 0"):
        validate(compose_config("cv.folds=1"))
    with pytest.raises(ConfigError, match="cv.fold=3 must be between 0 and cv.folds - 1 = 2"):
        validate(compose_config("cv.folds=3", "cv.fold=3"))


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, cache_root):
    root = real_dataset("malaria")
    cwd = tmp_path_factory.mktemp("cv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        result = run_cli("cellcls.train", "dataset=malaria", f"dataset.root={root}", "dataset.image_size=[32,32]",
                         "trainer.max_epochs=1", "cv.folds=3", "conformal=0.9", "logger=csv",
                         "trainer.progress_bar=false", "hydra.run.dir=run", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "run"


def read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cross_validation_scores_every_image_once_by_a_model_that_did_not_train_on_it(cv_run):
    predictions = read(cv_run / "cv_predictions.csv")
    files = [r["file"] for r in predictions]
    assert len(files) == len(set(files)) == 900  # the whole malaria subset: the flat folder is the training pool
    for k in (1, 2, 3):
        trained_on = {r["file"] for r in read(cv_run / f"fold_{k}" / "splits" / "train.csv")}
        validated_on = {r["file"] for r in read(cv_run / f"fold_{k}" / "splits" / "val.csv")}
        tested = {r["file"] for r in predictions if r["fold"] == str(k)}
        assert tested and not tested & (trained_on | validated_on)


def test_folds_keep_each_patient_on_one_side(cv_run):
    def patients(rows):
        return {re.match(r"^(C\d+)", r["file"].rsplit("/", 1)[-1]).group(1) for r in rows}

    by_fold = [patients(r for r in read(cv_run / "cv_predictions.csv") if r["fold"] == str(k)) for k in (1, 2, 3)]
    assert not (by_fold[0] & by_fold[1] or by_fold[0] & by_fold[2] or by_fold[1] & by_fold[2])


def test_the_cv_table_lists_each_fold_their_mean_and_sd_and_the_pooled_scores(cv_run):
    rows = read(cv_run / "cv_folds.csv")
    assert [r["fold"] for r in rows] == ["1", "2", "3", "mean", "sd", "pooled"]
    accuracies = [float(r["accuracy"]) for r in rows[:3]]
    assert float(rows[3]["accuracy"]) == pytest.approx(sum(accuracies) / 3)
    metrics = json.loads((cv_run / "cv_metrics.json").read_text())
    pooled = metrics["pooled"]
    assert pooled["num_images"] == 900 and pooled["interval"]["groups"] == 100  # patients, not images
    lo, hi = pooled["accuracy"]["ci95"]
    assert lo <= pooled["accuracy"]["value"] <= hi
    assert "Pooled out-of-fold predictions" in (cv_run / "cv_report.md").read_text()


def test_result_json_carries_the_cross_validated_score_for_sweeps(cv_run):
    result = json.loads((cv_run / "result.json").read_text())
    losses = [json.loads((cv_run / f"fold_{k}" / "test_metrics.json").read_text())["loss"] for k in (1, 2, 3)]
    assert result["status"] == "ok" and result["monitor"] == "cv_loss" and result["mode"] == "min"
    assert result["best"] == pytest.approx(sum(losses) / 3)


def test_out_of_fold_prediction_sets_are_reported_per_fold_and_pooled_with_a_grouped_interval(cv_run):
    predictions = read(cv_run / "cv_predictions.csv")
    covered = [r["true"] in r["set"].split("|") for r in predictions]
    assert all(r["predicted"] in r["set"].split("|") for r in predictions)
    sets = json.loads((cv_run / "cv_metrics.json").read_text())["pooled"]["prediction_sets"]
    assert sets["level"] == 0.9 and sets["method"] == "lac" and "other folds" in sets["fitted_on"]
    assert sets["coverage"]["value"] == pytest.approx(np.mean(covered))
    lo, hi = sets["coverage"]["ci95"]
    assert lo < sets["coverage"]["value"] <= hi
    assert [r["fold"] for r in sets["per_fold"]] == [1, 2, 3]
    assert sum(r["images"] for r in sets["per_fold"]) == 900
    assert set(sets["per_class"]) == {"Parasitized", "Uninfected"}
    assert "Prediction sets (conformal, aiming at coverage 0.9)" in (cv_run / "cv_report.md").read_text()


def test_a_folds_sets_come_from_a_threshold_fitted_without_its_own_images():
    from cellcls.scoring.conformal import cross_fold_sets, fit_conformal, prediction_sets

    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0], size=300)
    labels = np.array([rng.choice(2, p=p) for p in probs])
    folds = np.repeat([1, 2, 3], 100)
    members = cross_fold_sets(probs, labels, folds, 0.9)
    fit = fit_conformal(probs[folds != 2], labels[folds != 2], 0.9)
    assert (members[folds == 2] == prediction_sets(probs[folds == 2], fit.threshold, fit.method)).all()
    relabelled = labels.copy()
    relabelled[folds == 2] = 1 - relabelled[folds == 2]  # fold 2's own labels must not move its threshold
    assert (cross_fold_sets(probs, relabelled, folds, 0.9)[folds == 2] == members[folds == 2]).all()
    assert members[np.arange(300), labels].mean() >= 0.87  # exchangeable folds: the level, give or take


def test_running_the_cross_validation_again_keeps_the_finished_folds(cv_run, cache_root, monkeypatch):
    from cellcls.training.run import train

    before = {k: (cv_run / f"fold_{k}" / "checkpoints" / "best.pt").stat().st_mtime_ns for k in (1, 2, 3)}
    cfg = compose_config("dataset=malaria", f"dataset.root={real_dataset('malaria')}", "dataset.image_size=[32,32]",
                         "trainer.max_epochs=1", "cv.folds=3", "conformal=0.9", "logger=csv",
                         "trainer.progress_bar=false")
    train(cfg, cv_run, [])
    after = {k: (cv_run / f"fold_{k}" / "checkpoints" / "best.pt").stat().st_mtime_ns for k in (1, 2, 3)}
    assert before == after


def test_a_sweep_over_cross_validated_runs_ranks_them_by_the_cv_score(tmp_path):
    result = run_cli("cellcls.train", "-m", "cv.folds=2", "optim.lr=1e-3,1e-2", "logger=csv", "trainer.max_epochs=1",
                     *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    rows = read(folder / "summary.csv")
    assert len(rows) == 2 and all(r["status"] == "ok" and r["monitor"] == "cv_loss" for r in rows)
    for r in rows:
        job = json.loads((folder / r["run_dir"].rsplit("/", 1)[-1] / "result.json").read_text())
        assert float(r["best"]) == pytest.approx(job["best"])


def test_evaluate_rebuilds_a_folds_own_test_split(cv_run):
    from cellcls.evaluation.evaluate import evaluate

    result, _ = evaluate(cv_run / "fold_2", n_boot=20, make_plots=False, output=cv_run / "fold_2" / "eval_check")
    expected = json.loads((cv_run / "fold_2" / "test_metrics.json").read_text())
    assert result["num_images"] == expected["num_images"]
    assert result["accuracy"]["value"] == pytest.approx(expected["accuracy"])


def test_confident_learning_flags_an_image_whose_models_are_sure_of_another_class():
    from cellcls.scoring.label_errors import review_labels

    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.05, 0.95], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4]])
    review = review_labels(labels, probs)
    # thresholds: class 0 mean(0.9, 0.8, 0.05) = 0.583, class 1 mean(0.8, 0.9, 0.4) = 0.7
    np.testing.assert_allclose(review.thresholds, [0.5833, 0.7], atol=1e-4)
    assert review.issue.tolist() == [False, False, True, False, False, True]
    assert review.order[:2].tolist() == [2, 5] and review.suggested[[2, 5]].tolist() == [1, 0]


def test_the_label_review_flags_flipped_labels_the_models_were_sure_of(cv_run, tmp_path):
    """Five percent of a real cross-validated run's out-of-fold rows get the other label (seeded). Every flipped image
    whose models were confident of its original label (at or above that class's threshold) must be flagged and
    ranked above every image that is not. (How many of all flipped labels land near the top depends on how good
    the models are: docs/QUALITY.md measures it on a full cross-validation; this run trains one epoch.)"""
    import shutil

    from cellcls.label_errors import main

    run = tmp_path / "run"
    shutil.copytree(cv_run, run)
    rows = read(run / "cv_predictions.csv")
    rng = np.random.default_rng(0)
    flipped = set(rng.choice(len(rows), len(rows) // 20, replace=False).tolist())
    for i in flipped:
        rows[i]["true"] = "Parasitized" if rows[i]["true"] == "Uninfected" else "Uninfected"
    with open(run / "cv_predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main([f"run={run}"]) == 0
    ranked = read(run / "label_errors" / "label_errors.csv")
    assert [int(r["rank"]) for r in ranked] == list(range(1, len(rows) + 1))
    original = read(cv_run / "cv_predictions.csv")
    classes = ["Uninfected", "Parasitized"]
    truth = np.array([classes.index(r["true"]) for r in original])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in original])
    given = truth.copy()
    given[list(flipped)] = 1 - given[list(flipped)]
    thresholds = [probs[given == c, c].mean() for c in (0, 1)]
    sure = {original[i]["file"] for i in flipped if probs[i, truth[i]] >= thresholds[truth[i]]}
    assert len(sure) >= 5
    by_file = {r["file"]: r for r in ranked}
    assert all(by_file[f]["likely_error"] == "true" for f in sure)
    last_sure = max(int(by_file[f]["rank"]) for f in sure)
    assert all(r["likely_error"] == "true" for r in ranked[:last_sure])
    assert (run / "label_errors" / "label_errors.png").stat().st_size > 10_000


def test_the_label_review_needs_a_cross_validated_run(tmp_path):
    from cellcls.label_errors import main

    assert main([f"run={tmp_path}"]) == 2


def test_the_label_review_opens_no_file_outside_the_data_root(cv_run, tmp_path, monkeypatch):
    import shutil

    import cellcls.evaluation.label_review as review
    from cellcls.label_errors import main

    run = tmp_path / "run"
    shutil.copytree(cv_run, run)
    rows = read(run / "cv_predictions.csv")
    rows[0]["file"], rows[0]["true"] = "../../outside.png", "Parasitized"
    rows[0]["p_Uninfected"], rows[0]["p_Parasitized"] = "1.0", "0.0"  # ranked first
    with open(run / "cv_predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    opened = []
    real = review.load_image
    monkeypatch.setattr(review, "load_image", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    assert main([f"run={run}"]) == 0
    assert opened and not any("outside.png" in str(p) for p in opened)
    assert read(run / "label_errors" / "label_errors.csv")[0]["file"] == "../../outside.png"  # listed, not opened
