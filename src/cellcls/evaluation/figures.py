"""Figures of a trained model on real images: prediction grids, confident mistakes, Grad-CAM, feature maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellcls.evaluation import plots
from cellcls.evaluation.gradcam import find_layer, grad_cam
from cellcls.models.heads import labels_of
from cellcls.models.trained import LoadedModel


def probability_title(probs: np.ndarray, classes: Sequence[str], truth: int | None = None) -> str:
    """'pred / truth' and 'xx.xx% probability of being <class>' as the tutorials title their grids."""
    pred = int(labels_of(probs[None])[0])
    head = f"{classes[pred]} / {classes[truth]}" if truth is not None else classes[pred]
    return f"{head}\n{100 * probs[pred]:.2f}% probability of being {classes[pred]}"


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
    return plots.save(plots.image_grid([images[i] for i in idx], titles), path)


def mistakes_grid(images: Sequence[np.ndarray], probs: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: Path) -> Path | None:
    """The most confident wrong predictions; None when there are none."""
    labels = np.asarray(labels)
    wrong = np.flatnonzero(labels_of(probs) != labels)
    if len(wrong) == 0:
        return None
    worst = wrong[np.argsort(-probs[wrong].max(axis=1))][:9]
    titles = [probability_title(probs[i], classes, int(labels[i])) for i in worst]
    return plots.save(plots.image_grid([images[i] for i in worst], titles), path)


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
    return plots.save(plots.image_grid(overlays, titles), path)


def feature_stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs are shown: each convolution of a seed model's feature stack, ResNet's stages."""
    names = dict(model.named_children())
    if all(f"layer{i}" in names for i in range(1, 5)):
        return [("conv1", names["conv1"])] + [(f"layer{i}", names[f"layer{i}"]) for i in range(1, 5)]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][:8]


def feature_map_figure(loaded: LoadedModel, image: np.ndarray, path: Path) -> Path:
    """Outputs (after ReLU where the block has one) of each convolution block for one image."""
    outputs: list[tuple[str, np.ndarray]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.append((n, out[0].detach().relu().cpu().numpy())))
             for n, m in feature_stages(loaded.model)]
    try:
        loaded.predict(torch.from_numpy(np.ascontiguousarray(image[None])))
    finally:
        for h in hooks:
            h.remove()
    return plots.save(plots.feature_maps(outputs), path)
