"""The seed recipes set each tutorial's settings, overriding only what differs from the defaults."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, compose_config, real_dataset, run_cli

from cellcls.training.validate import validate
from cellcls.models import build_model

RECIPES = {
    "s0_blood_224": dict(dataset="blood_cells", size=[224, 224], channels=3, batch=32, model="skin_cnn", optim="adam",
                         augment="s0_blood_224", epochs=50, weights="none", early=False, scheduler="none"),
    "s1_malaria_lenet": dict(dataset="malaria", size=[128, 128], channels=3, batch=32, model="lenet", optim="adagrad",
                             augment="s1_malaria", epochs=20, weights="none", early=False, scheduler="none"),
    "s2_blood_80": dict(dataset="blood_cells", size=[80, 80], channels=3, batch=32, model="blood_cnn", optim="adadelta",
                        augment="s2_blood_80", epochs=30, weights="none", early=False, scheduler="none"),
    "s3_skin_cnn": dict(dataset="skin_cancer", size=[240, 240], channels=3, batch=32, model="skin_cnn", optim="adam",
                        augment="none", epochs=50, weights="none", early=False, scheduler="none"),
    "s4_pneumonia_xray": dict(dataset="pneumonia", size=[500, 500], channels=1, batch=16, model="xray_cnn",
                              optim="adam", augment="s4_pneumonia", epochs=25, weights="balanced", early=True,
                              scheduler="plateau"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_sets_its_tutorials_settings(recipe):
    want = RECIPES[recipe]
    cfg = compose_config(f"experiment={recipe}")
    validate(cfg)
    assert cfg.dataset.name == want["dataset"]
    assert list(cfg.dataset.image_size) == want["size"] and cfg.dataset.channels == want["channels"]
    assert cfg.dataset.batch_size == want["batch"]
    assert cfg.model.name == want["model"] and cfg.optim.name == want["optim"] and cfg.augment.name == want["augment"]
    assert cfg.trainer.max_epochs == want["epochs"] and cfg.class_weights == want["weights"]
    assert (cfg.callbacks.early_stopping is not None) == want["early"] and cfg.scheduler.name == want["scheduler"]


def test_s4_uses_the_tutorials_callbacks_and_a_single_sigmoid_logit():
    cfg = compose_config("experiment=s4_pneumonia_xray")
    assert cfg.trainer.monitor == "val_loss" and cfg.callbacks.early_stopping.patience == 3
    assert (cfg.scheduler.patience, cfg.scheduler.factor, cfg.scheduler.min_lr) == (2, 0.3, 1e-6)
    assert cfg.model.single_logit is True


def test_s3_keeps_the_l2_penalty_and_s0_drops_it():
    assert compose_config("experiment=s3_skin_cnn").model.dense_l2 == 0.001
    assert compose_config("experiment=s0_blood_224").model.dense_l2 == 0.0


def test_command_line_overrides_beat_the_recipe():
    cfg = compose_config("experiment=s4_pneumonia_xray", "class_weights=none", "trainer.max_epochs=3")
    assert cfg.class_weights == "none" and cfg.trainer.max_epochs == 3


def _leaves(node, prefix=""):
    """Every (dotted key, value) an experiment file sets, below its defaults list."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "defaults":
                yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_files_only_override_defaults(recipe):
    """Each key an experiment sets exists in the composed defaults (with the recipe's group choices) and changes
    its value there; each group choice differs from the primary config's."""
    from omegaconf import OmegaConf

    from cellcls.paths import config_dir

    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / "experiment" / f"{recipe}.yaml"))
    primary = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml"))["defaults"]
    chosen = {next(iter(d)): d[next(iter(d))] for d in primary if isinstance(d, dict)}
    choices = []
    for entry in raw["defaults"]:
        (key, value), = entry.items()
        group = key.removeprefix("override /")
        assert chosen.get(group) != value, f"{recipe} restates the default {group}={value}"
        choices.append(f"{group}={value}")
    base = OmegaConf.to_container(compose_config(*choices), resolve=True)
    for key, value in _leaves(raw):
        default = base
        for part in key.split("."):
            assert isinstance(default, dict) and part in default, f"{recipe} sets {key}, which no default has"
            default = default[part]
        assert default != value, f"{recipe} restates the default {key}={value!r}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_file_validates_and_builds_a_model_for_its_data(name):
    cfg = compose_config(f"experiment={name}")
    validate(cfg)
    channels, size = int(cfg.dataset.channels), [int(s) for s in cfg.dataset.image_size]
    model = build_model(cfg.model, channels, 2, size).eval()  # two classes: every recipe's data has at least two
    with torch.no_grad():
        logits = model(torch.zeros(3, channels, *size))
    assert logits.shape == ((3, 1) if cfg.model.single_logit else (3, 2))


def test_inspect_prints_counts_balance_sizes_and_class_weights(tmp_path):
    root = real_dataset("skin_cancer")
    result = run_cli("cellcls.data.inspect", "dataset=skin_cancer", f"dataset.root={root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train folder:" in out and "test  folder:" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["train"], ["val"], ["test"]) and line.split()[1].isdigit()}
    assert lines["test"] == ["60", "52", "112"]
    assert int(lines["train"][2]) + int(lines["val"][2]) == 330
    assert "width 256-256, height 256-256 px; modes: RGB" in out
    assert "class weights, balanced" in out and "benign 0.917" in out
    assert not (tmp_path / "outputs").exists()


def test_inspect_names_a_missing_root(tmp_path):
    result = run_cli("cellcls.data.inspect", "dataset=malaria", f"dataset.root={tmp_path / 'nope'}", cwd=tmp_path)
    assert result.returncode == 2 and "nope: no such folder" in result.stderr


def test_inspect_counts_patients_per_split_and_those_shared_with_train(tmp_path):
    root = real_dataset("malaria")
    result = run_cli("cellcls.data.inspect", "dataset=malaria", f"dataset.root={root}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("patients/groups per split")[1].splitlines()
    counts = {ln.split()[0]: ln.split()[1:] for ln in lines[1:4]}
    assert int(counts["train"][0]) > 0 and counts["val"][1:] == ["0", "also", "in", "train"]
    assert counts["test"][1:] == ["0", "also", "in", "train"]
