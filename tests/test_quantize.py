"""``export quantize=int8``: a statically quantised ONNX model, scored against fp32 on the test split before it is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import malaria_images

from cellcls.deploy.export import export_model
from cellcls.deploy.predict import predict_files
from cellcls.deploy.quantize import quantize_int8
from cellcls.deploy.runtimes import load_exported
from cellcls.errors import ConfigError
from cellcls.export import main as export_main
from cellcls.models.trained import load_model


@pytest.fixture(scope="module")
def int8(malaria_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    assert export_main([f"checkpoint={malaria_run}", "format=onnx", "quantize=int8", "max_drop=1", f"output={out}"]) == 0
    return out


def test_the_int8_model_is_smaller_and_its_card_reports_the_comparison_on_the_test_split(int8, malaria_run):
    card = json.loads(int8.with_name(int8.name + ".json").read_text())
    q = card["quantization"]
    assert q["method"].startswith("static int8") and q["calibration_images"] > 0
    assert q["test_images"] == json.loads((malaria_run / "test_metrics.json").read_text())["num_images"]
    assert q["int8"]["size_mb"] < q["fp32"]["size_mb"] / 2
    assert 0 <= q["int8"]["accuracy"] <= 1 and q["fp32"]["latency_ms_batch32"] > 0
    assert load_exported(int8).card["quantization"] == q  # embedded in the model too


def test_the_int8_model_predicts_real_cells_like_the_checkpoint(int8, malaria_run):
    files = malaria_images(8)
    got, _ = predict_files(load_exported(int8, device="cpu"), files)
    want, _ = predict_files(load_model(malaria_run, device="cpu"), files)
    assert np.abs(np.stack([g.probabilities for g in got]) - np.stack([w.probabilities for w in want])).max() < 0.05
    assert sum(g.label(["a", "b"]) == w.label(["a", "b"]) for g, w in zip(got, want)) >= 7


def test_an_int8_model_that_loses_too_much_accuracy_is_refused_with_the_numbers(malaria_run, tmp_path):
    loaded = load_model(malaria_run, device="cpu")
    fp32 = export_model(loaded, "onnx", tmp_path / "model.onnx")
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(ConfigError, match=r"(?s)accuracy .* vs .*more than max_drop=-1; it was not written"):
        quantize_int8(loaded, fp32, out, calibration=20, max_drop=-1.0)  # any result loses more than -1
    assert not out.exists()


def test_quantize_settings_are_checked_before_any_work(malaria_run, capsys):
    assert export_main([f"checkpoint={malaria_run}", "format=torchscript", "quantize=int8"]) != 0
    assert "quantize=int8 is for format=onnx or web" in capsys.readouterr().err
    assert export_main([f"checkpoint={malaria_run}", "format=onnx", "quantize=int4"]) != 0
    assert "allowed values: none, int8" in capsys.readouterr().err
    assert export_main([f"checkpoint={malaria_run}", "format=onnx", "quantize=int8", "max_drop=5"]) != 0
    assert "max_drop='5' is not valid" in capsys.readouterr().err
