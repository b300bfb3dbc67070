"""Input normalisation (`dataset.mean/std`: auto, null or numbers), the split seed and the initialisation default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, compose_config, train_in_process
from PIL import Image
from torch import nn

from cellcls.training.validate import validate
from cellcls.data.datamodule import build_data, resolve_root
from cellcls.data.normalization import channel_statistics
from cellcls.errors import ConfigError
from cellcls.models import build_model


def split_files(run: Path, split: str) -> list[str]:
    with open(run / "splits" / f"{split}.csv") as fh:
        return [row["file"] for row in csv.DictReader(fh)]


def test_auto_normalisation_standardises_each_channel_with_the_training_split_statistics(one_epoch_run):
    cfg = yaml.safe_load((one_epoch_run / "config.yaml").read_text())
    ckpt = torch.load(one_epoch_run / "checkpoints" / "last.pt", weights_only=True)
    data_root = resolve_root(compose_config(*TINY).dataset)  # where the synthetic set was rendered
    pixels = np.stack([np.asarray(Image.open(data_root / f).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR),
                                  dtype=np.float64) / 255 for f in split_files(one_epoch_run, "train")])
    assert cfg["dataset"]["mean"] == pytest.approx(pixels.mean(axis=(0, 1, 2)).tolist(), abs=1e-4)
    assert cfg["dataset"]["std"] == pytest.approx(pixels.std(axis=(0, 1, 2)).tolist(), abs=1e-4)
    # the numbers, not "auto", travel with the model: evaluation, export and serving read these
    assert ckpt["preprocessing"]["mean"] == cfg["dataset"]["mean"] and ckpt["preprocessing"]["std"] == cfg["dataset"]["std"]
    assert ckpt["config"]["dataset"]["mean"] == cfg["dataset"]["mean"]


def test_null_normalisation_keeps_the_tutorials_rescale_to_unit_range(tmp_path):
    train_in_process(tmp_path, "trainer.max_epochs=1", "logger=csv", "dataset.mean=null", "dataset.std=null", *TINY)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["preprocessing"]["mean"] is None and ckpt["preprocessing"]["std"] is None


def test_uncached_data_gets_the_same_statistics_as_the_cache(one_epoch_run, tmp_path):
    train_in_process(tmp_path, "trainer.max_epochs=1", "logger=csv", "dataset.cache=false", *TINY)
    cached = yaml.safe_load((one_epoch_run / "config.yaml").read_text())["dataset"]
    uncached = yaml.safe_load((tmp_path / "config.yaml").read_text())["dataset"]
    assert (uncached["mean"], uncached["std"]) == (cached["mean"], cached["std"])


def test_channel_statistics_read_in_chunks_equal_numpys_over_the_chosen_rows():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(50, 3, 8, 8), dtype=np.uint8)
    rows = [3, 7, 11, 40, 41, 42, 49]
    mean, std = channel_statistics(pixels, rows, chunk=2)
    chosen = pixels[rows].astype(np.float64) / 255
    assert mean == pytest.approx(chosen.mean(axis=(0, 2, 3)), abs=1e-4)
    assert std == pytest.approx(chosen.std(axis=(0, 2, 3)), abs=1e-4)


@pytest.mark.parametrize("mean,std,message", [
    ("auto", "null", "both be auto, both null, both one preset (imagenet) or both lists"),
    ("imagenet", "auto", "both be auto, both null, both one preset (imagenet) or both lists"),
    ("[0.5,0.5]", "[0.2,0.2]", "dataset.mean must be auto, null, a preset (imagenet) or 3 number(s)"),
    ("[0.5,0.5,0.5]", "[0.2,0.0,0.2]", "dataset.std must be positive"),
])
def test_a_bad_normalisation_setting_is_refused_before_any_work(mean, std, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config(f"dataset.mean={mean}", f"dataset.std={std}"))


@pytest.mark.parametrize("channels,mean,std", [
    (3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    (1, [0.449], [0.226]),  # grey: the channels' average, as the summed RGB stem sees it
])
def test_the_imagenet_preset_normalises_with_the_published_statistics(channels, mean, std):
    cfg = compose_config(*TINY, f"dataset.channels={channels}", "dataset.mean=imagenet", "dataset.std=ImageNet")
    validate(cfg)
    data = build_data(cfg.dataset, None, 0, torch.device("cpu"), "loader")
    stored = data.preprocessing.to_dict()
    assert stored["mean"] == mean and stored["std"] == std  # numbers: what checkpoints and exports keep
    images, _ = next(iter(data.loaders["val"]))
    raw = next(iter(build_data(compose_config(*TINY, f"dataset.channels={channels}", "dataset.mean=null",
                                              "dataset.std=null").dataset, None, 0, torch.device("cpu"),
                               "loader").loaders["val"]))[0]
    expected = (raw - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(images, expected)


def test_split_seed_fixes_the_split_while_the_seed_changes_the_training(tmp_path):
    runs = {}
    for name, seed, split_seed in (("a", 1, 7), ("b", 2, 7), ("c", 1, 8)):
        runs[name] = tmp_path / name
        train_in_process(runs[name], "trainer.max_epochs=1", "logger=csv", f"seed={seed}",
                         f"dataset.split_seed={split_seed}", *TINY)
    assert split_files(runs["a"], "val") == split_files(runs["b"], "val")
    assert split_files(runs["a"], "val") != split_files(runs["c"], "val")
    weights = [torch.load(runs[n] / "checkpoints" / "last.pt", weights_only=True)["model"] for n in ("a", "b")]
    assert not torch.equal(weights[0]["classifier.3.weight"], weights[1]["classifier.3.weight"])


def test_seed_models_start_from_pytorchs_initialisation_unless_keras_is_asked_for():
    torch.manual_seed(0)
    default = build_model({"name": "lenet"}, 3, 2, [32, 32])
    keras = build_model({"name": "lenet", "init": "keras"}, 3, 2, [32, 32])
    convs = [m for m in default.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias.abs().sum() > 0 for m in convs)  # PyTorch draws biases; Keras starts them at zero
    assert all(m.bias.abs().sum() == 0 for m in keras.modules() if isinstance(m, nn.Conv2d))
    first = keras.features[0].weight
    limit = (6 / (first.shape[1] * 9 + first.shape[0] * 9)) ** 0.5  # Glorot-uniform bound
    assert first.abs().max() <= limit and first.abs().max() > 0.8 * limit
    assert compose_config("model=lenet").model.init == "torch"


def test_the_test_metrics_of_a_run_include_roc_auc(one_epoch_run):
    test = json.loads((one_epoch_run / "test_metrics.json").read_text())
    assert 0.0 <= test["roc_auc"] <= 1.0
