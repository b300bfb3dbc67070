"""End-to-end training runs on the synthetic set: the run folder, TensorBoard, resume, callbacks, errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, run_cli, train_in_process
from sklearn.utils.class_weight import compute_class_weight
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic
from cellcls.errors import ConfigError
from cellcls.models import build_model
from cellcls.scoring.losses import l2_penalty
from cellcls.training.build import build_job
from cellcls.infra.runtime import cpu_bf16_works


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def read_tensorboard(run_dir: Path) -> EventAccumulator:
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """One real ``python -m cellcls.train`` of 3 epochs on a tiny synthetic set, run from a foreign folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = cwd / "run"
    result = run_cli("cellcls.train", f"hydra.run.dir={run_dir}", "trainer.max_epochs=3", *TINY, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_run_folder_holds_config_metrics_events_checkpoints_and_test_metrics(cli_run):
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.csv", "test_metrics.json",
                 "checkpoints/best.pt", "checkpoints/last.pt", "splits/train.csv", "splits/val.csv", "splits/test.csv",
                 "config.yaml"):
        assert (cli_run / name).is_file(), name
    rows = read_metrics(cli_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    test = json.loads((cli_run / "test_metrics.json").read_text())
    assert test["num_images"] == 32 and 0 <= test["accuracy"] <= 1 and test["checkpoint"] == "checkpoints/best.pt"


def test_checkpoints_hold_everything_needed_to_rebuild_and_resume(cli_run):
    last = torch.load(cli_run / "checkpoints/last.pt", weights_only=True)
    assert last["epoch"] == 3
    assert last["classes"] == ["uninfected", "parasitized"]
    assert last["preprocessing"]["image_size"] == [32, 32] and last["preprocessing"]["channels"] == 3
    assert last["config"]["model"]["name"] == "lenet"
    assert {"model", "training", "history", "monitor"} <= set(last) and last["format"] == "cellcls-checkpoint/2"
    assert {"optimizer", "scheduler", "callbacks"} <= set(last["training"])
    assert "wait" in last["training"]["callbacks"]["early_stopping"]
    best = torch.load(cli_run / "checkpoints/best.pt", weights_only=True)
    rows = read_metrics(cli_run)
    assert best["epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]


def test_tensorboard_events_hold_curves_lr_augmented_images_and_hparams(cli_run):
    acc = read_tensorboard(cli_run)
    rows = read_metrics(cli_run)
    for tag, column in (("loss/train", "train_loss"), ("loss/val", "val_loss"), ("accuracy/train", "train_accuracy"),
                        ("accuracy/val", "val_accuracy"), ("lr", "lr")):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[column] for r in rows], rel=1e-5)
    assert "train/augmented_samples" in acc.Tags()["images"]
    assert acc.PluginTagToContent("hparams"), "no hyper-parameter summary for the HParams view"
    assert acc.Scalars("hparam/best_val_loss")[0].value == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-5)


def test_train_returns_the_best_monitored_metric_for_sweepers(tmp_path):
    best = train_in_process(tmp_path, "trainer.max_epochs=2", *TINY)
    assert best == pytest.approx(min(r["val_loss"] for r in read_metrics(tmp_path)))


def test_resume_continues_from_the_stored_epoch_and_optimizer_state(tmp_path):
    train_in_process(tmp_path / "straight", "trainer.max_epochs=3", *TINY)
    train_in_process(tmp_path / "first", "trainer.max_epochs=2", *TINY)
    train_in_process(tmp_path / "resumed", f"trainer.resume={tmp_path / 'first'}", "trainer.max_epochs=3")

    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert resumed["epoch"] == 3
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)
    steps = [s["step"] for s in resumed["training"]["optimizer"]["state"].values()]
    assert all(int(s) == int(straight["training"]["optimizer"]["state"][0]["step"]) for s in steps)
    assert [r["epoch"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    assert read_metrics(tmp_path / "resumed")[:2] == read_metrics(tmp_path / "first")


def test_a_run_still_at_chance_is_neither_stopped_early_nor_has_its_lr_cut(tmp_path):
    # an LR far below float32 resolution leaves the weights unchanged: val_loss stays exactly at its first,
    # uncertain epoch's, never clearly better than chance, so patience never starts (it did: stopped at epoch 4
    # with the LR cut at 3, before patience waited for chance to be beaten; tests/test_callbacks.py has the rule)
    train_in_process(
        tmp_path, "optim=sgd", "optim.lr=1e-12", "optim.momentum=0", "scheduler.min_lr=0",
        "trainer.max_epochs=6", *TINY,
    )
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == pytest.approx([1e-12] * 6)


def test_early_stopping_fires_and_lr_drops_once_a_learning_run_plateaus(tmp_path):
    # the tiny synthetic set is learnt within an epoch or two (clearly better than chance), then min_delta=1
    # makes every later epoch count as no improvement: LR cut after 2 such epochs, stop after 3
    train_in_process(tmp_path, "callbacks.early_stopping.min_delta=1.0", "scheduler.threshold=1.0",
                     "trainer.max_epochs=10", *TINY)
    rows = read_metrics(tmp_path)
    first = next(i for i, r in enumerate(rows) if r["val_loss"] < 0.95 * math.log(2))
    assert len(rows) == first + 4, rows  # the first epoch better than chance, then patience 3
    assert rows[first + 3]["lr"] == pytest.approx(0.3 * rows[first]["lr"])


def test_balanced_class_weights_equal_sklearns_for_the_training_split(tmp_path):
    source = ensure_synthetic(SyntheticSpec(train_per_class=40, test_per_class=4, size=32))
    for split, keep in (("train", {"uninfected": 40, "parasitized": 12}), ("test", {"uninfected": 4, "parasitized": 4})):
        for name, n in keep.items():
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for f in sorted((source / split / name).glob("*.png"))[:n]:
                shutil.copy(f, tmp_path / "data" / split / name)
    cfg = compose_config(f"dataset.root={tmp_path / 'data'}", "class_weights=balanced", *TINY)
    job = build_job(cfg, tmp_path / "run")
    labels = job.data.splits["train"].labels
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(labels))
    torch.testing.assert_close(job.loss_fn.class_weights, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("model", ["lenet", "blood_cnn", "skin_cnn", "xray_cnn", "resnet18"])
def test_every_seed_model_trains_on_the_synthetic_set_by_changing_one_word(tmp_path, model):
    tiny96 = [o for o in TINY if "size" not in o] + ["dataset.render.size=96", "dataset.image_size=[96,96]",
                                                    "dataset.render.train_per_class=16", "dataset.render.test_per_class=4"]
    best = train_in_process(tmp_path, f"model={model}", "trainer.max_epochs=1", *tiny96)
    assert best == pytest.approx(read_metrics(tmp_path)[0]["val_loss"])
    assert (tmp_path / "checkpoints/best.pt").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=vgg99", "Available options in 'model'"),
        ("trainer.max_epochs=-2", "trainer.max_epochs must be an integer >= 1, got -2"),
        ("trainer.device=tpu", "trainer.device='tpu' is not valid; allowed values: auto, cpu, cuda"),
        ("dataset.root=/no/such/folder", "dataset.root=/no/such/folder: no such folder"),
    ],
)
def test_a_bad_override_fails_with_a_message_naming_the_setting_and_allowed_values(tmp_path, override, message):
    result = run_cli("cellcls.train", f"hydra.run.dir={tmp_path / 'run'}", override, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    if override == "model=vgg99":
        assert "lenet" in result.stderr and "xray_cnn" in result.stderr


@pytest.mark.slow
def test_the_main_command_trains_lenet_to_90_percent_validation_accuracy(tmp_path):
    result = run_cli("cellcls.train", cwd=tmp_path)  # exactly what the README tells a new user to type
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*_synthetic_lenet")
    assert "it/s" in result.stderr  # the progress bar
    assert max(r["val_accuracy"] for r in read_metrics(run_dir)) >= 0.90


def test_bf16_on_the_cpu_trains_where_it_works_and_is_refused_clearly_where_it_would_crash(tmp_path):
    result = run_cli("cellcls.train", f"hydra.run.dir={tmp_path}", "trainer.precision=bf16", "trainer.max_epochs=1",
                     *TINY, cwd=tmp_path)
    if cpu_bf16_works():
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(read_metrics(tmp_path)) == 1
    else:  # never a SIGILL: a message naming the setting and the way out
        assert result.returncode == 2
        assert "trainer.precision=bf16" in result.stderr and "precision=32" in result.stderr


def test_bf16_with_onednn_kept_off_amx_trains_on_this_cpu(tmp_path, monkeypatch):
    if not cpu_bf16_works():
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        cpu_bf16_works.cache_clear()
        if not cpu_bf16_works():
            pytest.skip("this CPU runs bf16 neither with nor without AMX")
    result = run_cli("cellcls.train", f"hydra.run.dir={tmp_path}", "trainer.precision=bf16", "trainer.max_epochs=1",
                     *TINY, cwd=tmp_path)
    cpu_bf16_works.cache_clear()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precision torch.bfloat16" in result.stdout


def test_fp16_on_the_cpu_is_refused_with_the_setting_named(tmp_path):
    with pytest.raises(ConfigError, match="trainer.precision=16 needs a CUDA device"):
        train_in_process(tmp_path, "trainer.precision=16", "trainer.max_epochs=1", *TINY)


def test_the_skin_cnn_l2_penalty_is_part_of_the_training_loss():
    model = build_model({"name": "skin_cnn", "dense_l2": 0.5}, 3, 2, (64, 64))
    dense = model.classifier[1].weight.detach()
    with torch.no_grad():
        assert float(l2_penalty(model)) == pytest.approx(0.5 * float(dense.pow(2).sum()), rel=1e-6)
        assert float(l2_penalty(build_model({"name": "lenet"}, 3, 2, (64, 64)))) == 0.0


def test_channels_last_gives_the_same_loss_and_gradients_as_the_default_layout():
    torch.manual_seed(0)
    model = build_model({"name": "lenet", "dropout": 0.0}, 3, 2, (64, 64))  # no random masks between the passes
    images, targets = torch.rand(8, 3, 64, 64), torch.randint(0, 2, (8,))
    reference = torch.nn.functional.cross_entropy(model(images), targets)
    reference.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    loss = torch.nn.functional.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), targets)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for grad, ref in zip((p.grad for p in model.parameters()), grads):
        torch.testing.assert_close(grad.contiguous(), ref.contiguous(), rtol=1e-4, atol=1e-6)


def test_training_in_the_default_layout_is_still_available(tmp_path):
    best = train_in_process(tmp_path, "trainer.channels_last=false", "trainer.max_epochs=1", *TINY)
    assert best == pytest.approx(read_metrics(tmp_path)[0]["val_loss"])


def test_tensorboard_draws_train_and_val_in_one_chart_and_hparams_name_the_model_size_and_epochs(cli_run):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = read_tensorboard(cli_run)
    (layout_tag,) = acc.PluginTagToContent("custom_scalars")
    layout = layout_pb2.Layout.FromString(acc.Tensors(layout_tag)[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["loss"] == ["loss/train", "loss/val"] and charts["accuracy"] == ["accuracy/train", "accuracy/val"]
    data = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in acc.PluginTagToContent("hparams").values()]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    experiment = next(d.experiment for d in data if d.HasField("experiment"))
    hp = {k: v.string_value or v.number_value for k, v in start.hparams.items()}
    assert hp["model"] == "lenet" and hp["image_size"] == "32x32x3" and hp["epochs"] == 3 and hp["parameters"] > 1000
    assert experiment.hparam_infos[0].name == "model"  # the table's first column
