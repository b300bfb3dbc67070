"""A timm model trained with the modern controls on real cells, then everything a user does with it: resume,
evaluate with flip TTA and Grad-CAM, export (ONNX and TorchScript), predict and the web app's JSON API."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Server, malaria_images, real_dataset, train_in_process

from cellcls.data.dataset import load_image
from cellcls.deploy.export import export_model
from cellcls.deploy.predict import predict_files
from cellcls.deploy.runtimes import load_exported
from cellcls.evaluation.evaluate import evaluate
from cellcls.models.trained import load_model

MODERN = ["model=timm", "model.arch=resnet18", "optim=adamw", "optim.backbone_lr_scale=0.5",
          "optim.decay_norm_and_bias=false", "scheduler=cosine", "scheduler.warmup_epochs=1", "label_smoothing=0.1",
          "trainer.ema_decay=0.9", "trainer.accumulate_grad_batches=2", "augment.policy=trivialaugment",
          "augment.mixup=0.2", "callbacks.freeze_backbone.epochs=1", "logger=csv", "trainer.progress_bar=false"]


def overrides(root: Path, epochs: int) -> list[str]:
    return ["dataset=malaria", f"dataset.root={root}", "dataset.image_size=[64,64]", f"trainer.max_epochs={epochs}",
            *MODERN]


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, cache_root) -> Path:
    import os

    os.environ["CELLCLS_CACHE"] = str(cache_root)
    run = tmp_path_factory.mktemp("timm") / "run"
    train_in_process(run, *overrides(real_dataset("malaria"), 2))
    return run


def test_best_pt_holds_the_validated_ema_and_last_pt_also_the_raw_weights(timm_run):
    last = torch.load(timm_run / "checkpoints/last.pt", weights_only=True)
    ema, raw = last["model"], last["training"]["ema"]["net"]
    assert last["training"]["ema"]["updates"] > 0 and ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    best = torch.load(timm_run / "checkpoints/best.pt", weights_only=True)
    assert best["model_spec"]["arch"] == "resnet18" and best["config"]["trainer"]["ema_decay"] == 0.9


def test_a_resumed_run_continues_from_the_raw_weights_and_their_average(timm_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(timm_run, run)
    before = torch.load(run / "checkpoints/last.pt", weights_only=True)
    train_in_process(run, *overrides(real_dataset("malaria"), 3), f"trainer.resume={run}")
    after = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert after["epoch"] == 3
    per_epoch = before["training"]["ema"]["updates"] // 2
    assert after["training"]["ema"]["updates"] == 3 * per_epoch  # the average went on counting, not from 0


def test_evaluate_with_flip_tta_writes_its_own_folder_with_grad_cam(timm_run):
    plain, _ = evaluate(timm_run, make_plots=False, n_boot=50, device="cpu")
    result, out = evaluate(timm_run, n_boot=50, device="cpu", tta="flips")
    assert out.name == "test_tta-flips" and result["tta"] == "flips" and result["split"] == "test"
    assert (out / "gradcam.png").is_file() and (out / "metrics.json").is_file()
    assert result["loss"] != plain["loss"]  # four views per image, not one


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_timm_model_exports_with_the_checkpoints_probabilities(timm_run, tmp_path, fmt):
    loaded = load_model(timm_run, device="cpu")
    exported = load_exported(export_model(loaded, fmt, tmp_path / ("m.onnx" if fmt == "onnx" else "m.torchscript.pt")))
    prep = loaded.preprocessing
    images = torch.stack([load_image(p, prep.channels, prep.image_size) for p in malaria_images(8)])
    np.testing.assert_allclose(exported.predict(images), loaded.predict(images), atol=1e-4, rtol=0)
    assert exported.card["model"] == "timm:resnet18"


def test_predict_with_tta_gives_the_average_of_the_flipped_predictions(timm_run):
    files = malaria_images(4)
    with_tta, _ = predict_files(load_model(timm_run, "cpu", tta="hflip"), files)
    plain = load_model(timm_run, "cpu")
    prep = plain.preprocessing
    images = torch.stack([load_image(p, prep.channels, prep.image_size) for p in files])
    with torch.inference_mode():
        x = plain.prepare(images)
        expected = plain.decision.probabilities((plain.model(x) + plain.model(x.flip(3))) / 2).numpy()
    np.testing.assert_allclose(np.stack([p.probabilities for p in with_tta]), expected, atol=1e-5)


def test_the_web_api_classifies_real_cells_with_a_timm_model_and_its_grad_cam(timm_run, tmp_path):
    server = Server(f"checkpoint={timm_run}", cwd=tmp_path)
    try:
        with urllib.request.urlopen(server.url + "api/info", timeout=60) as resp:
            info = json.load(resp)
        assert info["model"] == "timm:resnet18" and info["gradcam"] is True
        file = malaria_images(1)[0]
        body = json.dumps({"images": [{"name": file.name, "data": base64.b64encode(file.read_bytes()).decode()}],
                           "cam": True}).encode()
        req = urllib.request.Request(server.url + "api/predict", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.load(resp)
        (result,) = answer["results"]
        expected, _ = predict_files(load_model(timm_run, "cpu"), [file])
        assert result["ok"] and result["label"] == expected[0].label(info["classes"])
        assert abs(result["probabilities"][info["classes"][1]] - float(expected[0].probabilities[1])) < 1e-5
        assert result["cam_png"]
    finally:
        server.stop()
