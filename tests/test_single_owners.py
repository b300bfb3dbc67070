"""Facts with one owner: the run folder's names, the input recipe, the logits-to-label rule."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from cellcls.data.preprocessing import Normalize, Preprocessing, preprocess, to_unit
from cellcls.scoring.heads import labels_of, predicted_labels, probabilities
from cellcls.infra.run_folder import RunFolder, atomic_write


def test_every_file_a_run_writes_is_named_by_the_run_folder(one_epoch_run):
    run = RunFolder(one_epoch_run)
    named = {run.lock, run.config, run.metrics, run.result, run.test_metrics, run.test_predictions, run.model_summary,
             run.training_curves,
             run.augmented_samples, run.last_checkpoint, run.best_checkpoint,
             *(run.split_list(s) for s in ("train", "val", "test"))}
    written = {p for p in one_epoch_run.rglob("*") if p.is_file() and ".hydra" not in p.parts and "eval" not in p.parts}
    assert written == named, f"not named by RunFolder: {sorted(written - named)}; missing: {sorted(named - written)}"


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write(tmp_path / "result.json", "old")

    def broken(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_input_recipe_is_torchvisions_to_dtype_and_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    expected = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(images))
    assert torch.equal(preprocess(images, Preprocessing((8, 8), 3, mean, std)), expected)
    assert torch.allclose(Normalize(mean, std).inverse(expected), to_unit(images), atol=1e-6)
    assert torch.equal(preprocess(images, Preprocessing((8, 8), 3)), to_unit(images))


def test_the_input_recipe_reads_back_what_it_stored_and_fills_what_older_files_lack():
    recipe = Preprocessing((32, 48), 1, (0.5,), (0.25,), (40.0, 400.0), reference={"modes": ["L"]})
    assert Preprocessing.from_dict(recipe.to_dict()) == recipe
    assert Preprocessing.from_input_spec(recipe.input_spec()) == recipe  # an exported model's card keeps the window
    old = Preprocessing.from_dict({"image_size": [32, 32], "channels": 3, "mean": None, "std": None})
    assert (old.window, old.resize, old.scale, old.reference) == (None, "bilinear", "1/255", {})
    with pytest.raises(ValueError, match=r"best.pt is not usable: preprocessing lacks \['std'\]"):
        Preprocessing.from_dict({"image_size": [32, 32], "channels": 3, "mean": None}, source="best.pt")


@pytest.mark.parametrize("outputs", [1, 2, 4])
def test_labels_from_logits_and_from_probabilities_agree_for_both_heads(outputs):
    logits = torch.randn(64, outputs)
    assert torch.equal(predicted_labels(logits), torch.from_numpy(labels_of(probabilities(logits).numpy())))


def test_a_threshold_moves_the_binary_decision_only():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]]).numpy()
    assert labels_of(probs).tolist() == [0, 1]
    assert labels_of(probs, threshold=0.25).tolist() == [1, 1]


def test_grad_cam_keeps_no_activation_alive_after_it_returns():
    """A serving process computes Grad-CAM per request: a reference cycle through the tensor hook used to keep every
    request's activations alive (RSS grew 0.3 MB per call)."""
    import gc
    import weakref

    from cellcls.evaluation.gradcam import find_layer, grad_cam
    from cellcls.models import build_model

    model = build_model({"name": "lenet"}, 3, 2, [32, 32])
    layer = find_layer(model)
    seen: list[weakref.ref] = []
    probe = layer.register_forward_hook(lambda _m, _i, out: seen.append(weakref.ref(out)))
    cam = grad_cam(model, torch.rand(2, 3, 32, 32), layer)
    probe.remove()
    gc.collect()
    assert cam.shape == (2, 32, 32) and seen and seen[0]() is None


def test_prediction_titles_say_which_class_is_predicted_and_which_is_true_and_colour_mistakes():
    import numpy as np

    from cellcls.infra import plots
    from cellcls.evaluation.figures import probability_title, title_colors

    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert probability_title(probs[0], ["a", "b"], 1) == "predicted: a (90.0%)\ntrue: b"
    assert title_colors(probs, [0, 0], [0, 1]) == [plots.RIGHT, plots.WRONG]


def test_training_curves_mark_the_best_epoch_and_the_early_stop():
    from cellcls.infra import plots

    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": v, "train_accuracy": 0.5, "val_accuracy": 0.5, "lr": 1e-3}
            for e, v in ((1, 0.9), (2, 0.5), (3, 0.6))]
    fig = plots.training_curves(rows, best_epoch=2, stopped_epoch=3)
    labels = {line.get_label(): list(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()}
    assert labels["best.pt (epoch 2)"] == [2, 2] and labels["early stopping (epoch 3)"] == [3, 3]


def test_a_grad_cam_grid_has_a_labelled_colour_bar():
    import numpy as np

    from cellcls.infra import plots

    fig = plots.image_grid([np.zeros((3, 8, 8), np.uint8)], ["x"], heat_legend=plots.CAM_LEGEND)
    assert any(ax.get_ylabel() == plots.CAM_LEGEND for ax in fig.axes)


def test_feature_map_rows_are_named_by_layer_kind_and_output_shape():
    from torch import nn

    from cellcls.evaluation.figures import stage_label

    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert stage_label("features.0", conv, conv(torch.zeros(1, 3, 128, 128))) == "conv 3x3 -> 8@128x128 (features.0)"
