"""Figures of a trained model on real images: prediction grids, confident mistakes, Grad-CAM, feature maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellcls.infra import plots
from cellcls.evaluation.gradcam import find_layer, grad_cam
from cellcls.scoring.heads import labels_of
from cellcls.models.trained import LoadedModel


def probability_title(probs: np.ndarray, classes: Sequence[str], truth: int | None = None) -> str:
    """'predicted: <class> (xx.x%)' and, when known, 'true: <class>', said in words on the figure."""
    pred = int(labels_of(probs[None])[0])
    head = f"predicted: {classes[pred]} ({100 * probs[pred]:.1f}%)"
    return f"{head}\ntrue: {classes[truth]}" if truth is not None else head


def title_colors(probs: np.ndarray, labels: Sequence[int] | None, idx: Sequence[int]) -> list[str] | None:
    """Green titles for right predictions, red for wrong ones (None without the truth)."""
    if labels is None:
        return None
    predicted = labels_of(probs[list(idx)])
    return [plots.RIGHT if p == int(labels[i]) else plots.WRONG for p, i in zip(predicted, idx)]


GRID_NOTE = "title: predicted class (its probability) and true class; green = right, red = wrong"


def spread_by_class(labels: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` indices taking classes in turn, so a grid shows every class."""
    labels = np.asarray(labels)
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(int(queue.pop(0)))
    return chosen


def prediction_grid(images: Sequence[np.ndarray], probs: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: Path) -> Path:
    idx = spread_by_class(labels, 9)
    titles = [probability_title(probs[i], classes, int(labels[i])) for i in idx]
    return plots.save(plots.image_grid([images[i] for i in idx], titles, colors=title_colors(probs, labels, idx),
                                       suptitle=f"Predictions ({GRID_NOTE})"), path)


def mistakes_grid(images: Sequence[np.ndarray], probs: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: Path) -> Path | None:
    """The most confident wrong predictions; None when there are none."""
    labels = np.asarray(labels)
    wrong = np.flatnonzero(labels_of(probs) != labels)
    if len(wrong) == 0:
        return None
    worst = wrong[np.argsort(-probs[wrong].max(axis=1))][:9]
    titles = [probability_title(probs[i], classes, int(labels[i])) for i in worst]
    return plots.save(plots.image_grid([images[i] for i in worst], titles, colors=[plots.WRONG] * len(worst),
                                       suptitle="The most confident mistakes (predicted class and its probability; "
                                                "true class)"), path)


def cam_maps(loaded: LoadedModel, images: np.ndarray, layer: str | None = None, target: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM maps ``N x H x W`` for uint8 images (``N x C x H x W``), for the predicted or ``target`` class."""
    module = find_layer(loaded.model, layer)
    inputs = loaded.prepare(torch.from_numpy(np.ascontiguousarray(images)))
    tgt = torch.as_tensor(np.asarray(target)) if target is not None else None
    return grad_cam(loaded.model, inputs, module, tgt).cpu().numpy()


def cam_grid(loaded: LoadedModel, images: Sequence[np.ndarray], probs: np.ndarray, labels: Sequence[int] | None,
             path: Path, layer: str | None = None) -> Path:
    idx = spread_by_class(labels, 9) if labels is not None else list(range(min(9, len(images))))
    maps = cam_maps(loaded, np.stack([images[i] for i in idx]), layer)
    overlays = [plots.cam_overlay(images[i], m).transpose(2, 0, 1) for i, m in zip(idx, maps)]
    titles = [probability_title(probs[i], loaded.classes, int(labels[i]) if labels is not None else None) for i in idx]
    return plots.save(plots.image_grid(overlays, titles, colors=title_colors(probs, labels, idx),
                                       suptitle=f"Grad-CAM of the predicted class ({GRID_NOTE})",
                                       heat_legend=plots.CAM_LEGEND), path)


def stage_label(name: str, module: nn.Module, out: torch.Tensor) -> str:
    """A block's output described as Keras' summary would: ``conv 8@128x128`` (8 maps of 128 x 128)."""
    kind = f"conv {module.kernel_size[0]}x{module.kernel_size[1]}" if isinstance(module, nn.Conv2d) else name
    channels, height, width = out.shape[1:]
    return f"{kind} -> {channels}@{height}x{width} ({name})"


def feature_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs are shown: each convolution of a seed model's feature stack, ResNet's stages."""
    names = dict(model.named_children())
    if all(f"layer{i}" in names for i in range(1, 5)):
        return [("conv1", names["conv1"])] + [(f"layer{i}", names[f"layer{i}"]) for i in range(1, 5)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:8]


def feature_map_figure(loaded: LoadedModel, image: np.ndarray, path: Path) -> Path:
    """Outputs (after ReLU where the block has one) of each convolution block for one image."""
    outputs: list[tuple[str, np.ndarray]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, out, n=n: outputs.append(
        (stage_label(n, mod, out), out[0].detach().relu().cpu().numpy()))) for n, m in feature_stages(loaded.model)]
    try:
        loaded.predict(torch.from_numpy(np.ascontiguousarray(image[None])))
    finally:
        for h in hooks:
            h.remove()
    return plots.save(plots.feature_maps(outputs), path)
