"""Out-of-distribution flags: the Mahalanobis rule, its threshold, and a malaria model shown chest X-rays and skin
lesions through calibrate, evaluate, predict, the Python API and serve."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from cellcls.errors import ConfigError
from cellcls.scoring.ood import check_ood_level, fit_ood


def test_the_threshold_keeps_the_level_of_validation_inside_and_flags_far_points():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    train, val, new = (rng.normal(size=(n, 16)) @ mix for n in (600, 400, 2000))
    rule = fit_ood(train, val, 0.95, "test")
    assert rule.flags(val).mean() == pytest.approx(0.05, abs=0.01)
    assert rule.flags(new).mean() == pytest.approx(0.05, abs=0.02)  # new images of the same kind
    assert rule.flags(rng.normal(size=(200, 16)) @ mix + 8 * mix[0]).mean() > 0.95  # shifted by 8 of its spreads


def test_the_distance_is_measured_in_each_statistics_own_spread_and_correlation():
    rng = np.random.default_rng(1)
    wide, narrow = rng.normal(size=2000) * 10, rng.normal(size=2000)
    rule = fit_ood(np.c_[wide, narrow, wide + narrow], np.c_[wide, narrow, wide + narrow][:100], 0.9, "test")
    # 10 units along the wide axis is as unusual as 1 along the narrow one; breaking the correlation is unusual
    ten_wide, one_narrow = rule.score(np.array([[10.0, 0.0, 10.0], [0.0, 1.0, 1.0]]))
    assert ten_wide == pytest.approx(one_narrow, rel=0.15)
    assert rule.score(np.array([[10.0, 0.0, -10.0]]))[0] > 20 * ten_wide


def test_statistics_come_from_the_input_and_up_to_eight_convolutions_spread_over_the_depth():
    from cellcls.models import build_model
    from cellcls.scoring.ood import MAX_GROUPS, MAX_LAYERS, activation_statistics, statistic_layers

    lenet = build_model({"name": "lenet"}, 3, 2, (64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    stats, logits = activation_statistics(lenet, x)
    assert stats.shape == (2, 2 * (3 + 8 + 16 + 32) + 3) and torch.allclose(logits, lenet(x))  # + 3 channel pairs
    torch.testing.assert_close(stats[:, :3], x.mean(dim=(2, 3)))  # the input's channel means come first
    deep = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 100, 100, 1) for i in range(20)])
    layers = statistic_layers(deep)
    assert len(layers) == MAX_LAYERS and layers[0] == "0" and layers[-1] == "19"
    assert activation_statistics(deep, torch.randn(1, 3, 4, 4))[0].shape[1] == 2 * (3 + MAX_LAYERS * MAX_GROUPS) + 3


def test_a_greyscale_image_in_a_colour_models_input_shows_in_its_channel_correlations():
    from cellcls.models import build_model
    from cellcls.scoring.ood import CORRELATION_FLOOR, activation_statistics

    lenet = build_model({"name": "lenet"}, 3, 2, (32, 32)).eval()
    grey = torch.rand(1, 1, 32, 32).expand(1, 3, 32, 32) * torch.tensor([0.9, 1.1, 1.3]).view(1, 3, 1, 1)
    colour = torch.rand(1, 3, 32, 32)  # independent channels: r near 0
    at = 6  # after the input's three channel means and three spreads
    grey_r = activation_statistics(lenet, grey)[0][0, at:at + 3]
    colour_r = activation_statistics(lenet, colour)[0][0, at:at + 3]
    torch.testing.assert_close(grey_r, torch.full((3,), -math.log(CORRELATION_FLOOR)))  # r = 1 after any scaling
    assert (colour_r.abs() < 0.2).all()
    one = activation_statistics(build_model({"name": "lenet"}, 1, 2, (32, 32)).eval(), torch.rand(2, 1, 32, 32))[0]
    assert one.shape == (2, 2 * (1 + 8 + 16 + 32))  # one channel: no pair to correlate


def test_a_level_outside_zero_and_one_names_the_setting():
    with pytest.raises(ConfigError, match=r"ood='2' is not valid; expected the share of validation images"):
        check_ood_level("2")


@pytest.fixture(scope="module")
def ood_run(malaria_run, tmp_path_factory):
    """A copy of the real malaria run with the out-of-distribution rule fitted by the calibrate command."""
    from conftest import calibrated_copy

    return calibrated_copy(malaria_run, tmp_path_factory.mktemp("ood"), "ood=0.95")


def xrays_and_lesions(n: int) -> list:
    from conftest import real_dataset

    xrays = sorted(real_dataset("pneumonia").rglob("*.jpeg"))[:n]
    lesions = sorted(real_dataset("skin_cancer").rglob("*.jpg"))[:n]
    return xrays + lesions


def test_calibrate_stores_the_rule_and_evaluate_reports_the_flagged_share_of_the_test_cells(ood_run, tmp_path):
    from cellcls.evaluation.evaluate import evaluate
    from cellcls.infra.checkpoint import load_checkpoint

    stored = load_checkpoint(ood_run, "best.pt").ood
    assert stored["level"] == 0.95 and stored["precision"].shape == (121, 121) and stored["threshold"] > 0
    result, out = evaluate(ood_run, n_boot=50, make_plots=False, output=tmp_path / "eval")
    assert result["ood"]["images"] == result["num_images"] and result["ood"]["flagged"] <= 0.15
    assert "Out-of-distribution flags:" in (out / "report.md").read_text()


def test_a_malaria_model_flags_chest_xrays_and_skin_lesions_but_few_cells(ood_run):
    import cellcls
    from conftest import real_dataset

    model = cellcls.load(ood_run, "cpu")
    foreign = model.outside(xrays_and_lesions(20))
    cells = model.outside(sorted((real_dataset("malaria") / "cell_images").rglob("*.png"))[:200])
    assert np.mean(foreign) >= 0.9, np.mean(foreign)
    assert np.mean(cells) <= 0.1, np.mean(cells)  # training cells among them: well inside


def test_predict_marks_foreign_images_and_writes_the_outside_column(ood_run, tmp_path, capsys):
    from cellcls.predict import main

    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in xrays_and_lesions(3):
        shutil.copy(path, folder / path.name)
    out = tmp_path / "p.csv"
    assert main([f"checkpoint={ood_run}", f"input={folder}", f"output={out}", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and sum(r["outside"] == "true" for r in rows) >= 5
    assert printed.count("[outside what this model was trained on]") == sum(r["outside"] == "true" for r in rows)


def test_the_server_returns_the_flag_and_warns(ood_run, tmp_path):
    from conftest import Server
    from test_serve import call, upload

    xray = xrays_and_lesions(1)[0]
    srv = Server(f"checkpoint={ood_run}", cwd=tmp_path)
    try:
        status, out = call(srv.url + "api/predict", {"images": [upload(xray.name, xray.read_bytes())]})
    finally:
        srv.stop()
    result = out["results"][0]
    assert status == 200 and result["ok"] and result["outside"] is True
    assert any("outside what this model was trained on" in w for w in result["warnings"])


def test_the_api_says_how_to_get_flags_from_a_model_without_the_rule(malaria_run):
    import cellcls

    with pytest.raises(ValueError, match="has no out-of-distribution rule; train it with ood=0.95"):
        cellcls.load(malaria_run, "cpu").outside(np.zeros((1, 3, 64, 64), np.uint8))


def test_a_rule_of_another_method_is_ignored_with_a_warning_naming_the_fix(caplog):
    from cellcls.scoring.ood import OODRule

    with caplog.at_level("WARNING"):
        assert OODRule.of({"method": "knn", "bank": [], "level": 0.9}, "best.pt") is None
    assert "best.pt holds an out-of-distribution rule of another method (knn)" in caplog.text
    assert "python -m cellcls.calibrate checkpoint=<run> ood=0.9" in caplog.text


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_flags_the_same_images_as_its_checkpoint(ood_run, tmp_path, fmt):
    from cellcls.data.dataset import load_image
    from cellcls.deploy.export import export_model
    from cellcls.deploy.runtimes import load_exported
    from cellcls.models.trained import load_model
    from conftest import malaria_images

    loaded = load_model(ood_run, "cpu")
    path = export_model(loaded, fmt, tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'torchscript.pt'}")
    exported = load_exported(path, "cpu")
    files = xrays_and_lesions(4) + malaria_images(8)
    prep = loaded.preprocessing
    images = torch.stack([load_image(f, prep.channels, prep.image_size, window=prep.window) for f in files])
    probs, flags = exported.assess(images)
    want_probs, want_flags = loaded.assess(images)
    assert flags is not None and flags.tolist() == want_flags.tolist()
    assert flags[:8].mean() >= 0.75 and flags[8:].mean() <= 0.25
    np.testing.assert_allclose(probs, want_probs, atol=1e-4)
    assert exported.card["ood"]["threshold"] == loaded.ood.threshold


def test_predict_with_an_export_marks_foreign_images_and_calibrate_refuses_it(ood_run, tmp_path, capsys):
    from cellcls.calibrate import main as calibrate
    from cellcls.deploy.export import export_model
    from cellcls.models.trained import load_model
    from cellcls.predict import main as predict

    exported = export_model(load_model(ood_run, "cpu"), "onnx", tmp_path / "model.onnx")
    xray = xrays_and_lesions(1)[0]
    assert predict([f"checkpoint={exported}", f"input={xray}"]) == 0
    captured = capsys.readouterr()
    assert "[outside what this model was trained on]" in captured.out and "note:" not in captured.err
    assert calibrate([f"checkpoint={exported}", "ood=0.95"]) == 2
    assert "is an exported model; calibrate refits a PyTorch checkpoint" in capsys.readouterr().err
