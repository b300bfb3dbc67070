"""Multi-label runs after training and in ``evaluate``: per-finding thresholds fitted on validation, the test
split's per-finding metrics (``test_metrics.json`` / ``metrics.json``) and each image's finding probabilities
(``predictions.csv``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellcls.data.samples import Samples
from cellcls.errors import DataError
from cellcls.scoring.calibration import choose_threshold, parse_operating_point
from cellcls.data.splits import relative_path
from cellcls.infra.run_folder import write_csv
from cellcls.scoring.multilabel import FindingRule, finding_text, fit_thresholds, multilabel_metrics, summary_lines

if TYPE_CHECKING:  # evaluate.py imports this module: its types only, for the hints
    from cellcls.evaluation.evaluate import EvaluationData
    from cellcls.infra.run_folder import EvaluationFolder
    from cellcls.models.trained import LoadedModel

log = logging.getLogger(__name__)


def fit_rule(val_targets: np.ndarray, val_probs: np.ndarray, operating_point: str | None = None) -> FindingRule:
    """Each finding's threshold, fitted on the validation predictions: the largest Youden's J, or with
    ``operating_point`` (``sensitivity:0.9``) the threshold that reaches that level for every finding."""
    fitted_on = f"val ({len(val_targets)} images)"
    if not operating_point:
        return FindingRule(tuple(fit_thresholds(val_targets, val_probs)), fitted_on)
    kind, level = parse_operating_point(operating_point)
    cuts = []
    for k in range(val_targets.shape[1]):
        known = ~np.isnan(val_targets[:, k])
        try:
            cuts.append(choose_threshold(val_targets[known, k], val_probs[known, k], kind, level))
        except DataError as exc:
            raise DataError(f"operating_point={operating_point}: finding {k + 1} of {val_targets.shape[1]}: {exc}") from None
    return FindingRule(tuple(cuts), fitted_on, operating_point)


def write_finding_predictions(path: Path, samples: Samples, probs: np.ndarray, findings: Sequence[str],
                              root: Path | None, rule: FindingRule) -> None:
    """``predictions.csv`` of a multi-label model: each image, its true and predicted findings, and each finding's
    probability."""
    assert samples.targets is not None
    decided = rule.names(probs, findings)
    rows = [{"file": relative_path(file, root) if root else str(file),
             "true": finding_text(target, findings),
             "predicted": d,
             **{f"p_{f}": f"{v:.6f}" for f, v in zip(findings, p, strict=True)}}
            for file, target, p, d in zip(samples.paths, samples.targets, probs, decided, strict=True)]
    write_csv(path, rows, columns=("file", "true", "predicted", *[f"p_{f}" for f in findings]))


def score_split(targets: np.ndarray, probs: np.ndarray, findings: list[str], rule: FindingRule,
                groups: Sequence[str] | None, what: str) -> dict[str, Any]:
    """The split's multi-label metrics at ``rule``'s thresholds, logged one line per finding."""
    metrics = multilabel_metrics(targets, probs, findings, rule.thresholds, groups)
    metrics["decision"] = rule.to_dict()
    log.info("%s, per finding (thresholds fitted on %s):\n%s", what, rule.fitted_on or "none: 0.5",
             "\n".join(summary_lines(metrics)))
    return metrics


def finding_report(result: dict[str, Any], path: Path, figures: dict[str, Path]) -> None:
    """``report.md`` of a multi-label evaluation: the per-finding table, the averages and the figures."""
    lines = [f"# Evaluation: {result['split']}", "",
             f"checkpoint `{result['checkpoint']}` (epoch {result['epoch']}), {result['num_images']} images, "
             f"{len(result['findings'])} findings (one sigmoid each)", "", "```", *summary_lines(result), "```", "",
             f"Intervals: {result['interval']['method']}, over {result['interval']['groups']} units. Thresholds: "
             f"{result['decision'].get('fitted_on') or 'none fitted, 0.5 each'} "
             f"({result['decision'].get('operating_point') or 'largest Youden J'})."]
    lines += [f"\n## {title}\n\n![{title}]({p.name})" for title, p in figures.items()]
    path.write_text("\n".join(lines) + "\n")


def cam_per_finding(loaded: LoadedModel, images: Sequence[np.ndarray], probs: np.ndarray, targets: np.ndarray, path: Path,
                    layer: str | None = None, count: int = 3) -> Path:
    """Grad-CAM of each finding's logit (columns) on a few images that hold findings (rows), titled with the
    finding's probability and whether the image has it."""
    from cellcls.evaluation.figures import cam_maps
    from cellcls.infra import plots

    findings = loaded.classes
    with_findings = [i for i in range(len(targets)) if (targets[i] == 1).any()]
    chosen = (with_findings or list(range(len(targets))))[:count]
    overlays, titles = [], []
    for i in chosen:
        image = images[i]
        maps = cam_maps(loaded, np.stack([image] * len(findings)), layer, list(range(len(findings))))
        for k, cam in enumerate(maps):
            overlays.append(plots.cam_overlay(image, cam).transpose(2, 0, 1))
            truth = "?" if np.isnan(targets[i, k]) else ("yes" if targets[i, k] == 1 else "no")
            titles.append(f"{findings[k]} p={probs[i, k]:.2f} (has it: {truth})")
    return plots.save(plots.image_grid(overlays, titles, columns=len(findings),
                                       suptitle="Grad-CAM of each finding's logit (one row per image)",
                                       heat_legend=plots.CAM_LEGEND), path)


def evaluate_findings(loaded: LoadedModel, data: EvaluationData, out: EvaluationFolder, make_plots: bool,
                      cam_layer: str | None) -> dict[str, Any]:
    """``evaluate`` for a multi-label model: per-finding metrics at its thresholds, ``predictions.csv``, the
    report and per-finding Grad-CAM."""
    from cellcls.evaluation.evaluate import ImageRows
    from cellcls.infra.run_folder import write_json
    from cellcls.scoring.inference import mean_loss, run_inference

    logits, targets = run_inference(loaded.scorer, data.loader, loaded.device)
    y, probs = targets.numpy(), loaded.probabilities(logits).numpy()
    whole = len(data.samples) == len(y)  # uncached files that failed to decode mid-pass leave no row to name
    groups = data.groups if whole else None
    result = {"checkpoint": str(loaded.path), "epoch": loaded.epoch, "split": data.name, "tta": loaded.tta,
              "loss": mean_loss(loaded.model, logits, targets),
              **score_split(y, probs, loaded.classes, loaded.findings, groups, data.name)}
    if data.skipped:
        result["skipped_files"] = [p for p, _ in data.skipped]
    write_json(out.metrics, result)
    if whole:
        write_finding_predictions(out.predictions, data.samples, probs, loaded.classes, data.root, loaded.findings)
    figures: dict[str, Path] = {}
    if make_plots and whole:
        figures["Grad-CAM per finding"] = cam_per_finding(loaded, ImageRows(data.samples, loaded.preprocessing), probs,
                                                          y, out.figure("gradcam"), cam_layer)
    finding_report(result, out.report, figures)
    return result
