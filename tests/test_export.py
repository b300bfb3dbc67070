"""Exporting to ONNX and TorchScript: same outputs as PyTorch on real images, card inside and beside, predict parity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import malaria_images, run_cli
from omegaconf import OmegaConf

from cellcls.data.preprocessing import Preprocessing
from cellcls.data.dataset import load_image
from cellcls.deploy.export import export_model
from cellcls.deploy.predictor import load_predictor
from cellcls.deploy.runtimes import load_exported
from cellcls.models import build_model
from cellcls.models.trained import LoadedModel, load_model


def real_batch(loaded: LoadedModel, n: int = 12) -> torch.Tensor:
    prep = loaded.preprocessing
    return torch.stack([load_image(p, prep.channels, prep.image_size) for p in malaria_images(n)])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_gives_the_checkpoints_probabilities_on_real_images(malaria_run, tmp_path, fmt):
    loaded = load_model(malaria_run, device="cpu")
    path = export_model(loaded, fmt, tmp_path / f"model.{fmt}")
    images = real_batch(loaded)
    exported = load_exported(path, device="cpu")
    np.testing.assert_allclose(exported.predict(images), loaded.predict(images), atol=1e-4, rtol=0)
    assert exported.classes == ["Uninfected", "Parasitized"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_accepts_any_batch_size(malaria_run, tmp_path, fmt):
    loaded = load_model(malaria_run, device="cpu")
    exported = load_exported(export_model(loaded, fmt, tmp_path / f"model.{fmt}"), device="cpu")
    images = real_batch(loaded, 7)
    assert exported.predict(images[:1]).shape == (1, 2)
    np.testing.assert_allclose(exported.predict(images), loaded.predict(images), atol=1e-4, rtol=0)


def test_onnx_graph_has_a_dynamic_batch_axis_and_the_model_card_embedded(malaria_run, tmp_path):
    loaded = load_model(malaria_run, device="cpu")
    path = export_model(loaded, "onnx", tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    card = json.loads({p.key: p.value for p in proto.metadata_props}["cellcls"])
    assert card["classes"] == ["Uninfected", "Parasitized"]
    assert card["input"]["mean"] == [0.5, 0.5, 0.5] and card["graph"]["input"]["normalization"] == "inside the graph"
    assert json.loads((tmp_path / "m.onnx.json").read_text()) == card
    assert "val" in card["metrics"] and "test" in card["metrics"]


def test_exported_model_without_its_card_falls_back_to_the_file_beside_it(malaria_run, tmp_path):
    loaded = load_model(malaria_run, device="cpu")
    path = export_model(loaded, "onnx", tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    assert load_exported(path).classes == loaded.classes
    (tmp_path / "m.onnx.json").unlink()
    with pytest.raises(ValueError, match="carries no cellcls model card"):
        load_exported(path)


@pytest.mark.parametrize(("name", "channels", "size", "single_logit"),
                         [("blood_cnn", 3, 80, False), ("xray_cnn", 1, 128, True), ("resnet18", 3, 64, False)])
def test_every_seed_architecture_exports_to_onnx_with_the_same_outputs(tmp_path, name, channels, size, single_logit):
    spec = {"name": name, "single_logit": single_logit}
    torch.manual_seed(0)
    model = build_model(spec, channels, 2, [size, size]).eval()
    prep = Preprocessing((size, size), channels, (0.4,) * channels, (0.2,) * channels)
    loaded = LoadedModel(model, ["a", "b"], prep, OmegaConf.create({"model": spec}), tmp_path / "best.pt", 1,
                         torch.device("cpu"))
    exported = load_exported(export_model(loaded, "onnx", tmp_path / "m.onnx"))
    images = torch.randint(0, 256, (4, channels, size, size), dtype=torch.uint8)
    np.testing.assert_allclose(exported.predict(images), loaded.predict(images), atol=1e-4, rtol=0)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_with_an_onnx_model_equals_predict_with_its_checkpoint(malaria_run, tmp_path):
    folder = tmp_path / "cells"
    folder.mkdir()
    for p in malaria_images(10):
        (folder / p.name).write_bytes(p.read_bytes())
    export = run_cli("cellcls.export", f"checkpoint={malaria_run}", "format=onnx", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    onnx_path = malaria_run / "export" / "model.onnx"
    assert onnx_path.is_file() and "largest probability difference" in export.stdout
    for name, ckpt in (("ckpt.csv", str(malaria_run)), ("onnx.csv", str(onnx_path))):
        done = run_cli("cellcls.predict", f"checkpoint={ckpt}", f"input={folder}", f"output={tmp_path / name}", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    by_ckpt, by_onnx = read_csv(tmp_path / "ckpt.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["predicted"] for r in by_onnx] == [r["predicted"] for r in by_ckpt]
    for a, b in zip(by_ckpt, by_onnx):
        assert abs(float(a["p_Parasitized"]) - float(b["p_Parasitized"])) <= 1e-4


def test_load_predictor_tells_checkpoints_and_exports_apart(malaria_run, tmp_path):
    loaded = load_model(malaria_run, device="cpu")
    ts = export_model(loaded, "torchscript", tmp_path / "model.torchscript.pt")
    assert load_predictor(ts).supports_cam is False
    assert load_predictor(malaria_run).supports_cam is True
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_predictor(tmp_path / "missing.onnx")


def test_export_names_the_allowed_formats(malaria_run, tmp_path):
    done = run_cli("cellcls.export", f"checkpoint={malaria_run}", "format=tflite", cwd=tmp_path)
    assert done.returncode == 2 and "format='tflite' is not valid; allowed values: onnx, torchscript" in done.stderr


def test_predict_refuses_grad_cam_for_an_exported_model(malaria_run, tmp_path):
    loaded = load_model(malaria_run, device="cpu")
    path = export_model(loaded, "onnx", tmp_path / "m.onnx")
    done = run_cli("cellcls.predict", f"checkpoint={path}", f"input={malaria_images(1)[0]}", "cam=true", cwd=tmp_path)
    assert done.returncode == 2 and "cam=true needs the PyTorch checkpoint" in done.stderr
