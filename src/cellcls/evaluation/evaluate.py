"""Scoring a trained model on a split of its data set (rebuilt from the checkpoint alone), on any class-folder
directory or on a table of images, and writing the evaluation folder: metrics.json (headline metrics with 95%
bootstrap intervals), report.md, predictions.csv and figures; the scores and figures also go to the run's loggers."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cellcls.config.checks import apply_overrides
from cellcls.config.schema import DatasetConfig, TrainerConfig, typed
from cellcls.data.cache import decode_split
from cellcls.data.datamodule import build_data, fold_of
from cellcls.data.dataset import CachedImages, load_image
from cellcls.data.preprocessing import Preprocessing
from cellcls.data.samples import Samples
from cellcls.data.splits import relative_path
from cellcls.data.leakage import interval_groups
from cellcls.data.layouts import scan_location
from cellcls.data.layouts.table import is_table, table_file
from cellcls.data.transforms import build_transform
from cellcls.errors import ConfigError, DataError
from cellcls.infra import plots
from cellcls.scoring.calibration import (
    brier_score,
    expected_calibration_error,
    reliability,
)
from cellcls.evaluation.figures import (
    cam_grid,
    feature_map_figure,
    mistakes_grid,
    prediction_grid,
)
from cellcls.scoring.inference import mean_loss, run_inference
from cellcls.scoring.ood import collect_statistics
from cellcls.metric_names import HEADLINE
from cellcls.scoring.metrics import (
    IntervalRule,
    evaluate_predictions,
    most_confused,
    prediction_set_metrics,
    top_losses,
)
from cellcls.evaluation.multilabel import evaluate_findings
from cellcls.evaluation.patients import aggregate, write_patients
from cellcls.evaluation.subgroups import banded, column_values, require_all_decoded, subgroup_metrics, write_subgroups
from cellcls.evaluation.report import write_predictions, write_report
from cellcls.scoring.heads import Decision, labels_of, probabilities
from cellcls.models.trained import LoadedModel, load_model
from cellcls.paths import cache_dir
from cellcls.infra.run_folder import EvaluationFolder, write_json
from cellcls.infra.loggers import rebuilt_loggers
from cellcls.infra.runtime import eval_batch_size


class ImageRows:
    """Images of ``samples`` decoded on demand (the same pixels as the cache), for figures that show a few."""

    def __init__(self, samples: Samples, preprocessing: Preprocessing) -> None:
        self.samples, self.prep = samples, preprocessing

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return load_image(self.samples.paths[int(i)], self.prep.channels, self.prep.image_size,
                          window=self.prep.window).numpy()


@dataclass
class EvaluationData:
    """What is scored: the images, their loader, the files that could not be read, and what names them."""

    name: str  # the split, or the folder/table's name
    samples: Samples
    loader: DataLoader
    skipped: list[tuple[str, str]]
    root: Path  # what predictions.csv's paths are relative to
    groups: list[str] | None = None  # each image's patient or duplicate cluster, for the intervals
    table: Path | None = None  # the table listing the images, when they come from one (group_by=<column>)


@dataclass
class Scored:
    """A model's scores on :class:`EvaluationData`: the metrics (``metrics.json``) and the probabilities."""

    result: dict[str, Any]
    probs: np.ndarray
    labels: np.ndarray
    threshold: float | None
    folder: str  # the evaluation folder's name: the data's, with ``_tta-<mode>`` when flips are averaged on top


def load_data(loaded: LoadedModel, split: str, data: str | Path | None) -> EvaluationData:
    """``split`` of the run's own data set (rebuilt as it trained), or every image of ``data`` (a class-folder
    directory or a table, labelled with the checkpoint's classes)."""
    cfg = loaded.config
    # the checkpoint's data set and trainer sections, parsed once
    ds, trainer = typed(cfg.dataset, DatasetConfig), typed(cfg.trainer, TrainerConfig)
    batch = eval_batch_size(trainer.eval_batch_size, ds.batch_size, loaded.device)
    prep = loaded.preprocessing
    if data is not None:
        source = Path(data).expanduser().resolve()
        if not source.exists():
            raise DataError(f"data={data}: no such folder or table")
        found = scan_location(ds, source, list(loaded.classes))
        samples = found.splits["data"]
        decoded = decode_split(samples, prep.channels, prep.image_size, cache_dir(), desc=f"decoding {source.name}",
                               window=prep.window)
        kept = samples.subset(decoded.kept)
        images = CachedImages(decoded.file, decoded.kept, kept.training_targets(),
                              build_transform(None, prep.mean, prep.std))
        assert found.root is not None
        return EvaluationData(source.stem if source.is_file() else source.name, kept,
                              DataLoader(images, batch_size=batch), found.missing + decoded.skipped, found.root,
                              kept.groups, source if is_table(source) else None)
    bundle = build_data(ds, None, int(cfg.seed), loaded.device, trainer.pipeline, batch,
                        fold=fold_of(cfg))
    if split not in bundle.loaders:
        raise ConfigError(f"split={split!r} is not in this data set; available: {', '.join(bundle.loaders)}")
    samples = bundle.splits[split]
    table = table_file(str(ds.table.file), bundle.root) if ds.table is not None and ds.table.file else None
    return EvaluationData(split, samples, bundle.loaders[split], bundle.skipped, bundle.root,
                          interval_groups(ds, samples, bundle.splits), table)


def score(loaded: LoadedModel, data: EvaluationData, threshold: float | None, intervals: IntervalRule) -> Scored:
    """The metrics with bootstrap intervals (over patients or clusters where known), the loss and calibration, what
    a person should look at first, and the model's per-image trust rules where it has them."""
    # the same pass the training run's validation and test used, so the numbers match exactly
    logits, targets = run_inference(loaded.scorer, data.loader, loaded.device)
    probs = loaded.decision.probabilities(logits).numpy()
    groups = data.groups if data.groups is None or len(data.groups) == len(targets) else None  # failed decodes
    threshold = loaded.threshold if threshold is None else threshold
    y = targets.numpy()
    result = evaluate_predictions(y, probs, loaded.classes, threshold, intervals.resamples,
                                  seed=int(loaded.config.seed), groups=groups, interval=intervals.method)
    # with and without TTA side by side, unless the model itself averages flips (a probe fitted that way)
    fitted = str(loaded.config.model.get("tta") or "none")
    folder = data.name if loaded.tta in ("none", fitted) else f"{data.name}_tta-{loaded.tta}"
    result = {"checkpoint": str(loaded.path), "epoch": loaded.epoch, "split": data.name, "tta": loaded.tta,
              "loss": mean_loss(loaded.model, logits, targets), **result,
              "calibration": calibration_summary(y, probs, logits, loaded.decision),
              **interpretation(loaded, data, y, probs, threshold, result["confusion_matrix"]),
              **trust(loaded, data, y, probs, groups)}
    if data.skipped:
        result["skipped_files"] = [p for p, _ in data.skipped]
    return Scored(result, probs, y, threshold, folder)


def interpretation(loaded: LoadedModel, data: EvaluationData, y: np.ndarray, probs: np.ndarray,
                   threshold: float | None, confusion: list[list[int]]) -> dict[str, Any]:
    """The most confused class pairs and the images with the largest loss (their files, for a person to look at)."""
    out: dict[str, Any] = {"most_confused": most_confused(confusion, loaded.classes)}
    if len(data.samples) == len(y):  # uncached files that failed to decode mid-pass leave no row to name
        out["top_losses"] = [
            {"file": relative_path(data.samples.paths[i], data.root) if data.root else str(data.samples.paths[i]),
             "true": loaded.classes[int(y[i])],
             "predicted": loaded.classes[int(labels_of(probs[i:i + 1], threshold)[0])],
             "p_true": float(probs[i, y[i]]), "loss": loss} for i, loss in top_losses(y, probs)]
    return out


def trust(loaded: LoadedModel, data: EvaluationData, y: np.ndarray, probs: np.ndarray,
          groups: Sequence[str] | None) -> dict[str, Any]:
    """How the model's prediction sets covered (``prediction_sets``) and how many images its out-of-distribution rule
    flagged (``ood``), for the rules it has."""
    out: dict[str, Any] = {}
    if loaded.ood is not None:
        stats = collect_statistics(loaded.model, data.loader, loaded.device)
        out["ood"] = {"level": loaded.ood.level, "fitted_on": loaded.ood.fitted_on,
                      "flagged": float(loaded.ood.flags(stats).mean()), "images": len(stats),
                      "score_median": float(np.median(loaded.ood.score(stats))), "threshold": loaded.ood.threshold}
    members = loaded.decision.sets(probs)
    if members is not None:
        out["prediction_sets"] = prediction_set_metrics(y, members, loaded.classes, float(loaded.decision.set_level),
                                                        groups)
    return out


def write_scores(out: EvaluationFolder, loaded: LoadedModel, data: EvaluationData, scored: Scored,
                 group_by: str | None, group_rule: str, intervals: IntervalRule) -> None:
    """``metrics.json`` and ``predictions.csv``; with ``group_by=patient`` the per-patient metrics and
    ``patients.csv``, with ``group_by=<column>`` the metrics per subgroup and ``subgroups.csv``."""
    if group_by == "patient":
        scored.result["per_patient"] = per_patient(
            scored.labels, scored.probs, data.samples, str(loaded.config.dataset.name), group_rule, loaded.classes,
            scored.threshold, intervals, int(loaded.config.seed), out.patients)
    elif group_by is not None:
        scored.result["by_subgroup"] = by_subgroup(loaded, data, scored, group_by, out, intervals)
    write_json(out.metrics, scored.result)
    write_predictions(out.predictions, data.samples, scored.probs, loaded.classes, data.root, scored.threshold)


def draw_figures(out: EvaluationFolder, loaded: LoadedModel, data: EvaluationData, scored: Scored,
                 cam_layer: str | None) -> dict[str, Path]:
    """This evaluation's figures, and the run's own augmented samples and training curves beside them (the
    training callbacks drew those: they are copied, not redrawn)."""
    images = ImageRows(data.samples, loaded.preprocessing)
    probs, labels, classes = scored.probs, scored.labels, loaded.classes
    cal = scored.result["calibration"]
    figures = {
        "reliability diagram": plots.save(plots.reliability_diagram(cal["bins"], cal["ece"], data.name),
                                          out.figure("reliability")),
        "confusion matrix": plots.save(plots.confusion_heatmap(scored.result["confusion_matrix"], classes),
                                       out.figure("confusion_matrix")),
        "predictions": prediction_grid(images, probs, labels, classes, out.figure("predictions")),
    }
    worst = mistakes_grid(images, probs, labels, classes, out.figure("confident_mistakes"))
    if worst is not None:
        figures["most confident mistakes"] = worst
    figures["Grad-CAM"] = cam_grid(loaded, images, probs, labels, out.figure("gradcam"), cam_layer)
    figures["feature maps"] = feature_map_figure(loaded, images[0], out.figure("feature_maps"))
    if "by_subgroup" in scored.result:
        sub = scored.result["by_subgroup"]
        keys = [k for k in HEADLINE if k != "balanced_accuracy" and any(k in s for s in sub["subgroups"])]
        figures[f"results by {sub['column']}"] = plots.save(plots.subgroup_forest(sub["subgroups"], sub["column"], keys),
                                                            out.figure("subgroups"))
    for title, drawn, name in (("augmented training samples", loaded.run.augmented_samples, "augmented_samples"),
                               ("training curves", loaded.run.training_curves, "training_curves")):
        if drawn.is_file():
            figures[title] = Path(shutil.copy2(drawn, out.figure(name)))
    return figures


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
    interval: str = "grouped",
) -> tuple[dict[str, Any], Path]:
    """Score ``checkpoint`` and write the evaluation folder; returns (metrics, folder).

    ``interval`` is ``grouped`` or ``bootstrap`` (with ``n_boot`` resamples; see
    :func:`cellcls.scoring.metrics.evaluate_predictions`); ``threshold`` defaults to the checkpoint's operating point; ``group_by=patient`` adds per-patient results
    (``group_rule``: see :func:`cellcls.evaluation.patients.aggregate`); ``tta`` averages the logits over flipped
    copies of each image (:mod:`cellcls.models.tta`; the folder is then ``<split>_tta-<mode>``)."""
    loaded = load_model(checkpoint, device, tta)
    apply_overrides(loaded.config, overrides)
    found = load_data(loaded, split, data)
    if loaded.multilabel:
        out = EvaluationFolder(Path(output)) if output else loaded.run.evaluation(found.name)
        if group_by is not None or threshold is not None:
            raise ConfigError("group_by= and threshold= are for single-label models; a multi-label model is scored "
                              "per finding at the thresholds fitted on validation")
        return evaluate_findings(loaded, found, out, make_plots, cam_layer), out.root
    intervals = IntervalRule(interval, n_boot)
    scored = score(loaded, found, threshold, intervals)
    out = EvaluationFolder(Path(output)) if output else loaded.run.evaluation(scored.folder)
    write_scores(out, loaded, found, scored, group_by, group_rule, intervals)
    figures = draw_figures(out, loaded, found, scored, cam_layer) if make_plots else {}
    write_report(scored.result, out.report, figures)
    log_evaluation(loaded, scored.folder, scored.result, figures, overrides)
    return scored.result, out.root


def calibration_summary(y: np.ndarray, probs: np.ndarray, logits: torch.Tensor, decision: Decision) -> dict[str, Any]:
    """ECE, Brier score and the reliability bins of ``probs``; with a fitted temperature, the uncalibrated ECE too."""
    out: dict[str, Any] = {"ece": expected_calibration_error(y, probs), "brier": brier_score(y, probs),
                           "temperature": decision.temperature, "bins": reliability(y, probs)}
    if decision.temperature != 1.0:
        raw = probabilities(logits).numpy()
        out["uncalibrated"] = {"ece": expected_calibration_error(y, raw), "brier": brier_score(y, raw)}
    return out


def by_subgroup(loaded: LoadedModel, data: EvaluationData, scored: Scored, column: str,
                out: EvaluationFolder, intervals: IntervalRule) -> dict[str, Any]:
    """Metrics per value of ``column`` (a table column or DICOM header field), written to ``subgroups.csv``."""
    require_all_decoded(len(scored.labels), len(data.samples), column)
    t = loaded.config.dataset.get("table") or {}
    template = None if data.table is None or t.get("path_template") is None else str(t.get("path_template"))
    values = banded(column_values(column, data.samples.paths, data.table, data.root, str(t.get("path") or "path"),
                                  template))
    result = subgroup_metrics(scored.labels, scored.probs, loaded.classes, scored.threshold, values, data.groups,
                              int(loaded.config.seed), column, intervals)
    write_subgroups(out.subgroups, result)
    return result


def per_patient(y: np.ndarray, probs: np.ndarray, samples: Samples, dataset: str, rule: str,
                classes: list[str], threshold: float | None, intervals: IntervalRule, seed: int,
                out: Path) -> dict[str, Any]:
    """Metrics over patients (one aggregated prediction each), their rows written to ``out`` (patients.csv)."""
    if samples.groups is None:
        raise ConfigError("group_by=patient needs each image's patient: dataset.group_pattern (in the file name), "
                          f"dataset.group_tag (DICOM) or dataset.table.group; the {dataset} data set has none")
    if len(y) != len(samples):
        raise DataError("group_by=patient: some images could not be decoded; fix or remove them (see the warnings)")
    names, truth, scores, counts = aggregate(y, probs, samples.groups, rule)
    predicted = labels_of(scores, threshold)
    write_patients(out, names, truth, scores, counts, predicted, classes)
    metrics = evaluate_predictions(truth, scores, classes, threshold, intervals.resamples, seed=seed,
                                   interval=intervals.method)
    metrics["rule"] = rule if rule != "auto" else ("max" if len(classes) == 2 else "mean")
    return metrics


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
