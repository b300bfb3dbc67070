"""Loggers from the config list (MLflow read back with MLflow's client) and the Python API."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import TINY

import cellcls
from cellcls.data.datamodule import resolve_root
from cellcls.data.dataset import load_image
from cellcls.errors import ConfigError
from cellcls.evaluation.evaluate import evaluate
from cellcls.models.trained import load_model


def test_mlflow_logs_params_every_epochs_metrics_and_evaluate_adds_to_the_same_run(tmp_path):
    tracking = pytest.importorskip("mlflow.tracking")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = cellcls.train(["trainer.max_epochs=2", "logger=[csv,mlflow]", f"logger.mlflow.tracking_uri={uri}",
                         "logger.mlflow.experiment=cellcls-test", *TINY], run_dir=tmp_path / "run")
    # evaluate rebuilds its loggers from this cellcls's options, not the checkpoint's: the store is named again
    evaluate(run.folder, make_plots=False, n_boot=20, overrides=[f"logger.mlflow.tracking_uri={uri}"])

    client = tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cellcls-test")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "run"
    assert logged.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())  # beside the database, not in the cwd
    assert logged.data.params["model"] == "lenet" and logged.data.params["dataset"] == "synthetic"
    rows = list(csv.DictReader((run.folder / "metrics.csv").open()))
    history = client.get_metric_history(logged.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([float(r["val_loss"]) for r in rows])
    assert logged.data.metrics["eval_test/accuracy"] == pytest.approx(run.summary["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "train")}
    assert {"train/augmented_samples.png", "train/training_curves.png"} <= artifacts


def test_evaluate_logs_to_the_runs_tensorboard_and_csv(one_epoch_run, tmp_path):
    evaluate(one_epoch_run, output=tmp_path / "eval", make_plots=False, n_boot=20)
    rows = list(csv.DictReader((one_epoch_run / "eval" / "summary.csv").open()))
    assert rows[-1]["name"] == "test" and 0 <= float(rows[-1]["accuracy"]) <= 1


def test_the_api_trains_like_the_command_line(tmp_path):
    run = cellcls.train(["trainer.max_epochs=1", "logger=csv", *TINY], run_dir=tmp_path / "run")
    assert (run.folder / "checkpoints" / "best.pt").is_file()
    assert run.test_accuracy == run.summary["test"]["accuracy"]
    with pytest.raises(ConfigError, match="did you mean 'trainer.max_epochs'"):
        cellcls.train(["+trainer.max_epoch=1"], run_dir=tmp_path / "typo")


def test_cellcls_train_stays_the_api_function_once_the_training_command_is_imported():
    import cellcls.api
    import cellcls.commands.train  # noqa: F401 - what `python -m cellcls.train` and the cellcls-train script run

    assert cellcls.train is cellcls.api.train
    assert "__call__" not in vars(type(cellcls.commands.train))  # a plain module: no class swapped in at import


def test_a_loaded_model_predicts_files_and_arrays_as_the_checkpoint_does(one_epoch_run):
    model = cellcls.load(one_epoch_run)
    root = resolve_root(load_model(one_epoch_run).config.dataset)  # the synthetic set, rendered into the cache
    listed = (one_epoch_run / "splits" / "test.csv").read_text().splitlines()[1:5]
    paths = [f"{root}/{line.split(',')[0]}" for line in listed]
    labels = model.predict(paths)
    assert len(labels) == 4 and set(labels) <= set(model.classes)
    arrays = np.stack([load_image(p, 3, [32, 32]).numpy() for p in paths])
    np.testing.assert_allclose(model.predict_proba(arrays), model.predict_proba(paths))
    with pytest.raises(ValueError, match="uint8 N x 3 x 32 x 32"):
        model.predict_proba(arrays.astype(np.float32))


def test_predict_takes_one_path_as_one_image_and_an_empty_list_as_none(one_epoch_run):
    """Issue 27, item 9: a str path was walked letter by letter; [] failed inside torch.stack."""
    model = cellcls.load(one_epoch_run, device="cpu")
    image = next((resolve_root(model.predictor.config.dataset) / "test").rglob("*.png"))
    assert model.predict(str(image)) == model.predict([image]) and len(model.predict(str(image))) == 1
    assert model.predict([]) == [] and model.predict_proba([]).shape == (0, len(model.classes))


def test_a_learning_rate_of_zero_is_refused_by_name():
    from conftest import compose_config

    from cellcls.training.validate import validate

    with pytest.raises(ConfigError, match="optim.lr must be a positive number"):
        validate(compose_config("optim.lr=0"))
