"""The tutorials' figures as PNG files: curves, confusion matrix, image grids, feature maps, Grad-CAM overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
HEAT = "jet"  # the Grad-CAM colour map (blue: ignored, red: most attended), in overlays and their colour bars
CAM_LEGEND = "Grad-CAM: where the model looked (0 = ignored, 1 = most attended)"


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG of exactly its figure size x DPI pixels, and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def to_display(image: np.ndarray) -> np.ndarray:
    """``C x H x W`` uint8 -> ``H x W x C`` (or ``H x W`` for one channel) for imshow."""
    image = np.asarray(image)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def training_curves(history: Sequence[dict[str, float]], best_epoch: int | None = None,
                    stopped_epoch: int | None = None) -> Figure:
    """Loss and accuracy per epoch, train and val, with the learning rate on a second axis; a dashed line marks the
    epoch ``best.pt`` holds and a dotted one where early stopping ended the run."""
    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label=f"train {label}")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "s-", label=f"val {label}")
        if best_epoch:
            ax.axvline(best_epoch, color="green", linestyle="--", linewidth=1.2, label=f"best.pt (epoch {best_epoch})")
        if stopped_epoch:
            ax.axvline(stopped_epoch, color="red", linestyle=":", linewidth=1.2,
                       label=f"early stopping (epoch {stopped_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(epochs, [r["lr"] for r in history], "--", color="grey", label="learning rate")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("learning rate", color="grey")
        lines = ax.get_legend_handles_labels()
        lr_lines = lr_ax.get_legend_handles_labels()
        ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="best", fontsize=8)
    axes[0].set_title("loss")
    axes[1].set_title("accuracy")
    return fig


def confusion_heatmap(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """Counts and row-normalised rates (recall per true class) side by side."""
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    size = 3 + 0.9 * len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, data, title, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], rates, "rate per true class", "{:.2f}")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        for i in range(len(classes)):
            for j in range(len(classes)):
                dark = data[i, j] > data.max() / 2
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="white" if dark else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def subgroup_forest(subgroups: Sequence[dict], column: str, metrics: Sequence[str]) -> Figure:
    """Each subgroup's value of each metric with its 95% interval (a forest plot), one panel per metric."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.45 * len(subgroups) + 1.4),
                             layout="constrained", sharey=True, squeeze=False)
    names = [f"{s['value']} ({s['images']})" for s in subgroups]
    for ax, key in zip(axes[0], metrics):
        for i, s in enumerate(subgroups):
            if key not in s or np.isnan(s[key]["value"]):
                continue
            lo, hi = s[key]["ci95"]
            ax.plot([lo, hi], [i, i], color="tab:blue", lw=2)
            ax.plot(s[key]["value"], i, "o", color="tab:blue")
        ax.set_yticks(range(len(subgroups)), names)
        ax.set_ylim(len(subgroups) - 0.5, -0.5)  # the first subgroup on top
        ax.set_xlim(0, 1.02)
        ax.set_title(key.replace("_", " "))
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_ylabel(f"{column} (images)")
    return fig


def reliability_diagram(bins: Sequence[dict[str, float]], ece: float, title: str = "") -> Figure:
    """Accuracy against mean confidence per confidence bin (the diagonal is perfect calibration), with the share of
    images in each bin below."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), height_ratios=[3, 1], sharex=True, layout="constrained")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    mids = [(b["low"] + b["high"]) / 2 for b in bins]
    width = (bins[0]["high"] - bins[0]["low"]) if bins else 0.1
    top.bar(mids, [b["accuracy"] for b in bins], width=width * 0.9, color="#4c72b0", alpha=0.8, label="accuracy")
    top.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black", markersize=4,
             label="mean confidence of the bin")
    top.set_ylabel("accuracy of the predicted class")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Reliability{': ' + title if title else ''} (ECE {ece:.3f})")
    total = sum(b["count"] for b in bins) or 1
    bottom.bar(mids, [b["count"] / total for b in bins], width=width * 0.9, color="grey")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("share of images")
    bottom.set_xlim(0, 1)
    return fig


RIGHT, WRONG = "#1a7f37", "#c62828"  # title colours of a correct and a wrong prediction


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 3, cmap: str | None = None,
               colors: Sequence[str] | None = None, suptitle: str | None = None, heat_legend: str | None = None) -> Figure:
    """Images (``C x H x W`` uint8) in a grid, each with its title (in ``colors`` when given); ``heat_legend`` adds
    a colour bar of the Grad-CAM colour map with that label."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.9 * rows + (0.5 if suptitle else 0)),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image, title) in enumerate(zip(axes.flat, images, titles)):
        shown = to_display(image)
        ax.imshow(shown, cmap=cmap or ("gray" if shown.ndim == 2 else None), vmin=0, vmax=255)
        ax.set_title(title, fontsize=8, color=colors[i] if colors else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    if heat_legend:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=HEAT), ax=axes,
                           shrink=0.6, location="right")
        bar.set_label(heat_legend, fontsize=9)
    return fig


def feature_maps(stages: Sequence[tuple[str, np.ndarray]], per_stage: int = 8) -> Figure:
    """The first ``per_stage`` channels of each convolution block's output (``C x H x W``), one row per block,
    labelled with the block's description (e.g. ``conv 8@128x128``: 8 maps of 128 x 128)."""
    fig, axes = plt.subplots(len(stages), per_stage, figsize=(1.6 * per_stage, 1.8 * len(stages)), squeeze=False,
                             layout="constrained")
    for row, (name, maps) in enumerate(stages):
        for col in range(per_stage):
            ax = axes[row, col]
            ax.axis("off")
            if col < maps.shape[0]:
                ax.imshow(maps[col], cmap="viridis")
            if col == 0:
                ax.set_title(name, fontsize=7, loc="left")
    return fig


def cam_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An ``H x W x 3`` uint8 picture of ``image`` with the heat map ``cam`` (values in [0, 1]) blended over it."""
    base = to_display(image).astype(np.float32)
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    heat = matplotlib.colormaps[HEAT](np.clip(cam, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * base + alpha * heat, 0, 255).astype(np.uint8)


def png_to_array(path: Path) -> np.ndarray:
    """A saved PNG as ``H x W x 3`` uint8, for TensorBoard."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))
