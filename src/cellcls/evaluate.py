"""``python -m cellcls.evaluate checkpoint=<checkpoint or run folder> [split=test] [data=<dir>] [settings]``

Scores a trained model on a split of its data set (rebuilt from the checkpoint alone) or on any class-folder
directory (``data=<dir>``), and writes ``<run>/eval/<split or folder>/``: metrics.json (each headline metric with a
95% bootstrap interval), report.md, predictions.csv and figures, also logged to the run's TensorBoard.

Settings: split=train|val|test, data=<dir>, threshold=<p> (binary: class 1 when its probability >= p),
bootstrap=<n> (resamples, 1000), device=auto|cpu|cuda, cam_layer=<layer name>, output=<dir>, plots=true|false,
and dataset.<key>=<value> to change the data set's settings (e.g. dataset.root=<dir> when the data moved).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cellcls import plots
from cellcls.cli import as_bool, command_args, fail, parse_key_values
from cellcls.config import apply_overrides
from cellcls.data.cache import decode_split
from cellcls.data.datamodule import build_data
from cellcls.data.dataset import CachedImages, load_image
from cellcls.data.layout import Samples, scan_split
from cellcls.data.transforms import build_augment, build_transform
from cellcls.errors import ConfigError, DataError
from cellcls.figures import cam_grid, feature_map_figure, mistakes_grid, prediction_grid
from cellcls.hardware import eval_batch_size
from cellcls.inference import LoadedModel, load_model, mean_loss, run_inference
from cellcls.losses import probabilities
from cellcls.metrics import evaluate_predictions
from cellcls.paths import cache_dir

SETTINGS = ("checkpoint", "split", "data", "threshold", "bootstrap", "device", "cam_layer", "output", "plots")
HEADLINE = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")


class ImageRows:
    """Images of ``samples`` decoded on demand (the same pixels as the cache), for figures that show a few."""

    def __init__(self, samples: Samples, preprocessing: dict[str, Any]) -> None:
        self.samples, self.prep = samples, preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_image(self.samples.paths[int(i)], self.prep["channels"], self.prep["image_size"]).numpy()


def _folder_data(loaded: LoadedModel, folder: Path, batch_size: int) -> tuple[Samples, DataLoader, list]:
    """A class-folder directory scored with the checkpoint's classes (matched case-insensitively)."""
    alias_cfg = loaded.config.dataset.get("class_aliases")
    aliases = OmegaConf.to_container(alias_cfg) if alias_cfg else None
    samples = scan_split(folder, loaded.classes, aliases)
    prep = loaded.preprocessing
    decoded = decode_split(samples, prep["channels"], prep["image_size"], cache_dir(), desc=f"decoding {folder.name}")
    kept = samples.subset(decoded.kept)
    transform = build_transform(None, prep["mean"], prep["std"])
    dataset = CachedImages(decoded.file, decoded.kept, kept.labels, transform)
    return kept, DataLoader(dataset, batch_size=batch_size), decoded.skipped


def write_report(result: dict[str, Any], path: Path, figures: dict[str, Path]) -> None:
    lines = [f"# Evaluation: {result['split']}", "",
             f"checkpoint `{result['checkpoint']}` (epoch {result['epoch']}), {result['num_images']} images", "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    for key in HEADLINE:
        if key in result:
            v, (lo, hi) = result[key]["value"], result[key]["ci95"]
            lines.append(f"| {key} | {v:.4f} | {lo:.4f} - {hi:.4f} |")
    lines.append(f"| loss | {result['loss']:.4f} | |")
    lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for cls in result["classes"]:
        r = result["per_class"][cls]
        lines.append(f"| {cls} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(result["classes"]) + " |", "|---" * (len(result["classes"]) + 1) + "|"]
    for cls, row in zip(result["classes"], result["confusion_matrix"]):
        lines.append(f"| {cls} | " + " | ".join(str(v) for v in row) + " |")
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{k}]({p.name})" for k, p in figures.items())]
    path.write_text("\n".join(lines) + "\n")


def write_predictions(path: Path, samples: Samples, probs: np.ndarray, classes: Sequence[str], root: Path | None) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "true", "predicted", *[f"p_{c}" for c in classes]])
        for file, label, p in zip(samples.paths, samples.labels, probs):
            name = file.relative_to(root).as_posix() if root and file.is_relative_to(root) else str(file)
            writer.writerow([name, classes[label], classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])


def evaluate(
    checkpoint: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    overrides: Sequence[str] = (),
    threshold: float | None = None,
    n_boot: int = 1000,
    device: str = "auto",
    cam_layer: str | None = None,
    output: str | Path | None = None,
    make_plots: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Score ``checkpoint`` and write the evaluation folder; returns (metrics, folder)."""
    loaded = load_model(checkpoint, device)
    cfg = loaded.config
    apply_overrides(cfg, overrides)
    train_samples = None
    t = cfg.get("trainer", {})
    batch = eval_batch_size(t.get("eval_batch_size", "auto"), int(cfg.dataset.batch_size), loaded.device)
    if data is not None:
        folder = Path(data).expanduser().resolve()
        samples, loader, skipped = _folder_data(loaded, folder, batch)
        name, root = folder.name, folder
    else:
        bundle = build_data(cfg.dataset, None, int(cfg.seed), loaded.device, str(t.get("pipeline", "auto")), batch)
        if split not in bundle.loaders:
            raise ConfigError(f"split={split!r} is not in this data set; available: {', '.join(bundle.loaders)}")
        samples, loader, skipped, name, root = bundle.splits[split], bundle.loaders[split], bundle.skipped, split, bundle.root
        train_samples = bundle.splits["train"]

    # the same pass the training run's validation and test used, so the numbers match exactly
    logits, targets = run_inference(loaded.model, loader, loaded.device)
    probs = probabilities(logits).numpy()
    result = evaluate_predictions(targets.numpy(), probs, loaded.classes, threshold, n_boot, seed=int(cfg.seed))
    result = {"checkpoint": str(loaded.path), "epoch": loaded.epoch, "split": name,
              "loss": mean_loss(loaded.model, logits, targets), **result}
    if skipped:
        result["skipped_files"] = [p for p, _ in skipped]

    out = Path(output) if output else loaded.run_dir / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    write_predictions(out / "predictions.csv", samples, probs, loaded.classes, root)
    figures: dict[str, Path] = {}
    if make_plots:
        labels = targets.numpy()
        images = ImageRows(samples, loaded.preprocessing)
        figures["confusion matrix"] = plots.save(plots.confusion_heatmap(result["confusion_matrix"], loaded.classes),
                                                 out / "confusion_matrix.png")
        figures["predictions"] = prediction_grid(images, probs, labels, loaded.classes, out / "predictions.png")
        worst = mistakes_grid(images, probs, labels, loaded.classes, out / "confident_mistakes.png")
        if worst is not None:
            figures["most confident mistakes"] = worst
        figures["Grad-CAM"] = cam_grid(loaded, images, probs, labels, out / "gradcam.png", cam_layer)
        figures["feature maps"] = feature_map_figure(loaded, images[0], out / "feature_maps.png")
        figures["augmented training samples"] = _augmented_grid(
            cfg, ImageRows(train_samples if train_samples is not None else samples, loaded.preprocessing),
            out / "augmented_samples.png")
        history = loaded.run_dir / "metrics.csv"
        if history.is_file():
            with open(history) as fh:
                rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
            figures["training curves"] = plots.save(plots.training_curves(rows), out / "training_curves.png")
    write_report(result, out / "report.md", figures)
    _log_tensorboard(loaded, name, result, figures)
    return result, out


def _augmented_grid(cfg, images: ImageRows, path: Path) -> Path:
    """Nine training images through the run's configured augmentation, as the model saw them in training."""
    transforms = build_augment(OmegaConf.to_container(cfg.augment)) if cfg.get("augment") else []
    torch.manual_seed(0)
    picked = []
    for i in range(9):
        image = torch.from_numpy(images[i % len(images)])
        for t in transforms:
            image = t(image)
        picked.append(image.numpy())
    name = cfg.augment.get("name", "none") if cfg.get("augment") else "none"
    return plots.save(plots.image_grid(picked, [f"augment={name}"] * 9), path)


def _log_tensorboard(loaded: LoadedModel, name: str, result: dict[str, Any], figures: dict[str, Path]) -> None:
    tb = loaded.run_dir / "tensorboard"
    if not tb.is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tb)) as writer:
        for key in HEADLINE:
            if key in result and np.isfinite(result[key]["value"]):
                writer.add_scalar(f"eval_{name}/{key}", result[key]["value"], loaded.epoch)
        writer.add_scalar(f"eval_{name}/loss", result["loss"], loaded.epoch)
        for title, path in figures.items():
            writer.add_image(f"eval_{name}/{title.replace(' ', '_')}", plots.png_to_array(path), loaded.epoch, dataformats="HWC")
        writer.add_text(f"eval_{name}/metrics", "```\n" + json.dumps(result, indent=2) + "\n```", loaded.epoch)


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own, overrides = parse_key_values(args, SETTINGS, required=("checkpoint",))
        threshold = float(own["threshold"]) if "threshold" in own else None
        if threshold is not None and not 0 < threshold < 1:
            raise ConfigError(f"threshold={threshold} must be between 0 and 1")
        result, out = evaluate(
            own["checkpoint"], own.get("split", "test"), own.get("data"), overrides, threshold,
            int(own.get("bootstrap", 1000)), own.get("device", "auto"), own.get("cam_layer"), own.get("output"),
            as_bool("plots", own.get("plots", "true")),
        )
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    for key in HEADLINE:
        if key in result:
            v, (lo, hi) = result[key]["value"], result[key]["ci95"]
            print(f"{key:<18} {v:.4f}  (95% CI {lo:.4f} - {hi:.4f})")
    print(f"{'loss':<18} {result['loss']:.4f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
