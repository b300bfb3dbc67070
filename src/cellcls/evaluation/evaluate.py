"""Scoring a trained model on a split of its data set (rebuilt from the checkpoint alone), on any class-folder
directory or on a table of images, and writing the evaluation folder: metrics.json (headline metrics with 95%
bootstrap intervals), report.md, predictions.csv and figures; the scores and figures also go to the run's loggers."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cellcls.config.checks import apply_overrides
from cellcls.data.cache import decode_split
from cellcls.data.datamodule import build_data, fold_of
from cellcls.data.dataset import CachedImages, load_image
from cellcls.data.samples import Samples
from cellcls.data.leakage import interval_groups
from cellcls.data.layouts import scan_location
from cellcls.data.transforms import build_augment, build_transform
from cellcls.errors import ConfigError, DataError
from cellcls.infra import plots
from cellcls.scoring.calibration import (
    brier_score,
    expected_calibration_error,
    reliability,
)
from cellcls.evaluation.figures import (
    augmented_title,
    cam_grid,
    feature_map_figure,
    mistakes_grid,
    prediction_grid,
    spread_by_class,
)
from cellcls.scoring.inference import mean_loss, run_inference
from cellcls.metric_names import HEADLINE
from cellcls.scoring.metrics import evaluate_predictions
from cellcls.evaluation.patients import aggregate, write_patients
from cellcls.evaluation.report import write_predictions, write_report
from cellcls.scoring.heads import Decision, labels_of, probabilities
from cellcls.models.trained import LoadedModel, load_model
from cellcls.paths import cache_dir
from cellcls.infra.run_folder import write_json
from cellcls.infra.loggers import rebuilt_loggers
from cellcls.infra.runtime import eval_batch_size


class ImageRows:
    """Images of ``samples`` decoded on demand (the same pixels as the cache), for figures that show a few."""

    def __init__(self, samples: Samples, preprocessing: dict[str, Any]) -> None:
        self.samples, self.prep = samples, preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_image(self.samples.paths[int(i)], self.prep.channels, self.prep.image_size,
                          window=self.prep.window).numpy()


def _external_data(loaded: LoadedModel, data: Path, batch_size: int) -> tuple[Samples, DataLoader, list, Path]:
    """A class-folder directory, or a table (``dataset.table`` settings; paths relative to the table's folder,
    every row whatever its split), scored with the checkpoint's classes; returns its images root too."""
    found = scan_location(loaded.config.dataset, data, list(loaded.classes))
    samples = found.splits["data"]
    prep = loaded.preprocessing
    decoded = decode_split(samples, prep.channels, prep.image_size, cache_dir(), desc=f"decoding {data.name}",
                           window=prep.window)
    kept = samples.subset(decoded.kept)
    transform = build_transform(None, prep.mean, prep.std)
    dataset = CachedImages(decoded.file, decoded.kept, kept.labels, transform)
    assert found.root is not None
    return kept, DataLoader(dataset, batch_size=batch_size), found.missing + decoded.skipped, found.root


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
    group_by: str | None = None,
    group_rule: str = "auto",
    tta: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score ``checkpoint`` and write the evaluation folder; returns (metrics, folder).

    ``threshold`` defaults to the checkpoint's operating point; ``group_by=patient`` adds per-patient results
    (``group_rule``: see :func:`cellcls.evaluation.patients.aggregate`); ``tta`` averages the logits over flipped
    copies of each image (:mod:`cellcls.models.tta`; the folder is then ``<split>_tta-<mode>``)."""
    loaded = load_model(checkpoint, device, tta)
    cfg = loaded.config
    apply_overrides(cfg, overrides)
    train_samples = None
    groups: list[str] | None = None
    t = cfg.trainer
    batch = eval_batch_size(t.eval_batch_size, int(cfg.dataset.batch_size), loaded.device)
    if data is not None:
        source = Path(data).expanduser().resolve()
        if not source.exists():
            raise DataError(f"data={data}: no such folder or table")
        samples, loader, skipped, root = _external_data(loaded, source, batch)
        name = source.stem if source.is_file() else source.name
        groups = samples.groups
    else:
        bundle = build_data(cfg.dataset, None, int(cfg.seed), loaded.device, str(t.pipeline), batch,
                            fold=fold_of(cfg))
        if split not in bundle.loaders:
            raise ConfigError(f"split={split!r} is not in this data set; available: {', '.join(bundle.loaders)}")
        samples, loader, skipped, name, root = bundle.splits[split], bundle.loaders[split], bundle.skipped, split, bundle.root
        train_samples = bundle.splits["train"]
        groups = interval_groups(cfg.dataset, samples, bundle.splits)

    # the same pass the training run's validation and test used, so the numbers match exactly
    logits, targets = run_inference(loaded.scorer, loader, loaded.device)
    probs = loaded.decision.probabilities(logits).numpy()
    if groups is not None and len(groups) != len(targets):  # uncached images that failed to decode mid-pass
        groups = None
    threshold = loaded.threshold if threshold is None else threshold
    y = targets.numpy()
    result = evaluate_predictions(y, probs, loaded.classes, threshold, n_boot, seed=int(cfg.seed), groups=groups)
    tta = loaded.tta
    # with and without TTA side by side, unless the model itself averages flips (a probe fitted that way)
    fitted = str(loaded.config.model.get("tta") or "none")
    folder = name if tta in ("none", fitted) else f"{name}_tta-{tta}"
    result = {"checkpoint": str(loaded.path), "epoch": loaded.epoch, "split": name, "tta": tta,
              "loss": mean_loss(loaded.model, logits, targets), **result,
              "calibration": calibration_summary(y, probs, logits, loaded.decision)}
    if skipped:
        result["skipped_files"] = [p for p, _ in skipped]

    out = Path(output) if output else loaded.run.evaluation(folder)
    write_json(out / "metrics.json", result)
    write_predictions(out / "predictions.csv", samples, probs, loaded.classes, root, threshold)
    if group_by is not None:
        result["per_patient"] = per_patient(y, probs, samples, cfg.dataset, group_by, group_rule, loaded.classes,
                                            threshold, n_boot, int(cfg.seed), out)
        write_json(out / "metrics.json", result)
    figures: dict[str, Path] = {}
    if make_plots:
        labels = targets.numpy()
        images = ImageRows(samples, loaded.preprocessing)
        cal = result["calibration"]
        figures["reliability diagram"] = plots.save(plots.reliability_diagram(cal["bins"], cal["ece"], name),
                                                    out / "reliability.png")
        figures["confusion matrix"] = plots.save(plots.confusion_heatmap(result["confusion_matrix"], loaded.classes),
                                                 out / "confusion_matrix.png")
        figures["predictions"] = prediction_grid(images, probs, labels, loaded.classes, out / "predictions.png")
        worst = mistakes_grid(images, probs, labels, loaded.classes, out / "confident_mistakes.png")
        if worst is not None:
            figures["most confident mistakes"] = worst
        figures["Grad-CAM"] = cam_grid(loaded, images, probs, labels, out / "gradcam.png", cam_layer)
        figures["feature maps"] = feature_map_figure(loaded, images[0], out / "feature_maps.png")
        shown = train_samples if train_samples is not None else samples
        figures["augmented training samples"] = _augmented_grid(
            cfg, ImageRows(shown, loaded.preprocessing), shown.labels, loaded.classes, out / "augmented_samples.png")
        history = loaded.run.metrics
        if history.is_file():
            with open(history) as fh:
                rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
            record = json.loads(loaded.run.result.read_text()) if loaded.run.result.is_file() else {}
            stopped = int(rows[-1]["epoch"]) if record.get("stopped_early") else None
            figures["training curves"] = plots.save(plots.training_curves(rows, record.get("best_epoch"), stopped),
                                                    out / "training_curves.png")
    write_report(result, out / "report.md", figures)
    log_evaluation(loaded, folder, result, figures, overrides)
    return result, out


def calibration_summary(y: np.ndarray, probs: np.ndarray, logits: torch.Tensor, decision: Decision) -> dict[str, Any]:
    """ECE, Brier score and the reliability bins of ``probs``; with a fitted temperature, the uncalibrated ECE too."""
    out: dict[str, Any] = {"ece": expected_calibration_error(y, probs), "brier": brier_score(y, probs),
                           "temperature": decision.temperature, "bins": reliability(y, probs)}
    if decision.temperature != 1.0:
        raw = probabilities(logits).numpy()
        out["uncalibrated"] = {"ece": expected_calibration_error(y, raw), "brier": brier_score(y, raw)}
    return out


def per_patient(y: np.ndarray, probs: np.ndarray, samples: Samples, ds: DictConfig, group_by: str, rule: str,
                classes: list[str], threshold: float | None, n_boot: int, seed: int, out: Path) -> dict[str, Any]:
    """Metrics over patients (one aggregated prediction each) and ``patients.csv``."""
    if group_by != "patient":
        raise ConfigError(f"group_by={group_by!r} is not valid; allowed value: patient")
    if samples.groups is None:
        raise ConfigError("group_by=patient needs each image's patient: dataset.group_pattern (in the file name), "
                          f"dataset.group_tag (DICOM) or dataset.table.group; the {ds.name} data set has none")
    if len(y) != len(samples):
        raise DataError("group_by=patient: some images could not be decoded; fix or remove them (see the warnings)")
    names, truth, scores, counts = aggregate(y, probs, samples.groups, rule)
    predicted = labels_of(scores, threshold)
    write_patients(out / "patients.csv", names, truth, scores, counts, predicted, classes)
    metrics = evaluate_predictions(truth, scores, classes, threshold, n_boot, seed=seed)
    metrics["rule"] = rule if rule != "auto" else ("max" if len(classes) == 2 else "mean")
    return metrics


def _augmented_grid(cfg, images: ImageRows, labels: Sequence[int], classes: Sequence[str], path: Path) -> Path:
    """Nine training images through the run's configured augmentation, as the model saw them in training."""
    transforms = build_augment(OmegaConf.to_container(cfg.augment))
    torch.manual_seed(0)
    picked, idx = [], spread_by_class(labels, 9)  # every class, not the first nine files
    for i in idx:
        image = torch.from_numpy(images[i])
        for t in transforms:
            image = t(image)
        picked.append(image.numpy())
    titles = [classes[int(labels[i])] for i in idx]
    return plots.save(plots.image_grid(picked, titles, suptitle=augmented_title(cfg.augment.name)), path)


def log_evaluation(loaded: LoadedModel, name: str, result: dict[str, Any], figures: dict[str, Path],
                   overrides: Sequence[str] = ()) -> None:
    """The scores and figures, through the kinds of logger the run trained with (into the same TensorBoard/MLflow
    run), built from this command's config rather than the checkpoint's."""
    scores = {k: float(result[k]["value"]) for k in HEADLINE if k in result}
    scores["loss"] = float(result["loss"])
    names = [n for n, node in (loaded.config.get("logger") or {}).items() if node is not None]
    loggers = rebuilt_loggers(names, overrides, loaded.run)
    try:
        loggers.log_evaluation(name, scores, loaded.epoch, figures)
    finally:
        loggers.close()
