"""Facts with one owner: the run folder's names, the input recipe, the logits-to-label rule."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from cellcls.data.preprocessing import Normalize, preprocess, to_unit
from cellcls.models.heads import labels_of, predicted_labels, probabilities
from cellcls.run_folder import RunFolder, atomic_write


def test_every_file_a_run_writes_is_named_by_the_run_folder(one_epoch_run):
    run = RunFolder(one_epoch_run)
    named = {run.config, run.metrics, run.result, run.test_metrics, run.model_summary, run.training_curves,
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
    assert torch.equal(preprocess(images, {"mean": mean, "std": std}), expected)
    assert torch.allclose(Normalize(mean, std).inverse(expected), to_unit(images), atol=1e-6)
    assert torch.equal(preprocess(images, {"mean": None, "std": None}), to_unit(images))


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
