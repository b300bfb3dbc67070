"""The evaluation folder's text files: report.md and predictions.csv."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellcls.data.samples import Samples
from cellcls.data.splits import relative_path
from cellcls.evaluation.subgroups import describe_gap
from cellcls.metric_names import HEADLINE
from cellcls.scoring.heads import labels_of
from cellcls.infra.run_folder import atomic_write, write_csv


def metric_rows(metrics: dict[str, Any]) -> list[str]:
    """Markdown table rows: each headline metric with its 95% interval (and the interval's method when not the
    bootstrap)."""
    rows = []
    for key in HEADLINE:
        if key in metrics:
            v, (lo, hi) = metrics[key]["value"], metrics[key]["ci95"]
            note = f" ({metrics[key]['method']})" if "method" in metrics[key] else ""
            rows.append(f"| {key} | {v:.4f} | {lo:.4f} - {hi:.4f}{note} |")
    return rows


def subgroup_lines(sub: dict[str, Any] | None) -> list[str]:
    """The report's section for ``group_by=<column>``: one row per subgroup and the largest gap."""
    if not sub:
        return []
    keys = [k for k in HEADLINE if any(k in s for s in sub["subgroups"])]
    lines = ["", f"## By {sub['column']}", "", f"| {sub['column']} | images | patients | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 3) + "|"]
    for s in sub["subgroups"]:
        cells = [f"{s[k]['value']:.3f} ({s[k]['ci95'][0]:.3f}-{s[k]['ci95'][1]:.3f})" if k in s else "" for k in keys]
        lines.append(f"| {s['value']} | {s['images']} | {'' if s['groups'] is None else s['groups']} | "
                     + " | ".join(cells) + " |")
    return lines + ["", describe_gap(sub["largest_gap"], sub["column"]).capitalize() + ". One row per subgroup: "
                    "subgroups.csv."]


def prediction_set_lines(sets: dict[str, Any] | None) -> list[str]:
    """The report's section for prediction sets (``conformal=``): coverage with its interval, set sizes, per class."""
    if not sets:
        return []
    lo, hi = sets["coverage"]["ci95"]
    fitted = f" Threshold fitted on {sets['fitted_on']}." if sets.get("fitted_on") else ""
    lines = ["", f"## Prediction sets (conformal, aiming at coverage {sets['level']:g})", "",
             f"Coverage {sets['coverage']['value']:.4f} (95% CI {lo:.4f} - {hi:.4f}), mean set size "
             f"{sets['mean_size']:.3f}, single-class sets {100 * sets['singletons']:.1f}%.{fitted}", "",
             "| true class | images | coverage | mean set size | single-class sets |", "|---|---|---|---|---|"]
    lines += [f"| {c} | {r['images']} | {r['coverage']:.4f} | {r['mean_size']:.3f} | {100 * r['singletons']:.1f}% |"
              for c, r in sets["per_class"].items()]
    if sets.get("per_fold"):
        lines += ["", "| fold | images | coverage | mean set size | single-class sets |", "|---|---|---|---|---|"]
        lines += [f"| {r['fold']} | {r['images']} | {r['coverage']:.4f} | {r['mean_size']:.3f} | "
                  f"{100 * r['singletons']:.1f}% |" for r in sets["per_fold"]]
    return lines


def write_report(result: dict[str, Any], path: Path, figures: dict[str, Path]) -> None:
    lines = [f"# Evaluation: {result['split']}", "",
             f"checkpoint `{result['checkpoint']}` (epoch {result['epoch']}), {result['num_images']} images", "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    lines += metric_rows(result)
    lines.append(f"| loss | {result['loss']:.4f} | |")
    if "interval" in result:
        resamples = result["interval"].get("resamples")
        lines += ["", f"Intervals: {result['interval']['method']}"
                      + (f" ({resamples} resamples)" if resamples else "") + " unless the row names another method."]
    if "threshold" in result:
        lines += ["", (f"Decision threshold: class {result['classes'][1]} when its probability is at least "
                       f"{result['threshold']:.4f}.")]
    cal = result.get("calibration")
    if cal:
        before = cal.get("uncalibrated")
        lines += ["", f"Calibration: ECE {cal['ece']:.4f}, Brier score {cal['brier']:.4f}"
                  + (f" with temperature {cal['temperature']:.3f} (uncalibrated: ECE {before['ece']:.4f}, "
                     f"Brier {before['brier']:.4f})" if before else " (no temperature scaling)") + "."]
    lines += prediction_set_lines(result.get("prediction_sets"))
    ood = result.get("ood")
    if ood:
        lines += ["", f"Out-of-distribution flags: {100 * ood['flagged']:.1f}% of these {ood['images']} images are "
                      f"outside what the model was trained on (threshold: the validation {ood['level']:g} quantile "
                      f"of the distance from the training images' activation statistics; fitted on {ood['fitted_on']})."]
    patients = result.get("per_patient")
    if patients:
        lines += ["", f"## Per patient ({patients['num_images']} patients, rule: {patients['rule']})", "",
                  "| metric | value | 95% CI |", "|---|---|---|"]
        lines += metric_rows(patients)
        lines += ["", "One row per patient: patients.csv."]
    lines += subgroup_lines(result.get("by_subgroup"))
    lines += ["", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for cls in result["classes"]:
        r = result["per_class"][cls]
        lines.append(f"| {cls} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(result["classes"]) + " |", "|---" * (len(result["classes"]) + 1) + "|"]
    for cls, row in zip(result["classes"], result["confusion_matrix"]):
        lines.append(f"| {cls} | " + " | ".join(str(v) for v in row) + " |")
    confused = result.get("most_confused") or []
    if confused:
        lines += ["", "Most confused (true -> predicted: images): "
                  + ", ".join(f"{p['true']} -> {p['predicted']}: {p['count']}" for p in confused[:6]) + "."]
    worst = result.get("top_losses") or []
    if worst:
        lines += ["", "## Top losses (the most confidently wrong images first; grid: confident_mistakes.png)", "",
                  "| file | true | predicted | p(true) | loss |", "|---|---|---|---|---|"]
        lines += [f"| {w['file']} | {w['true']} | {w['predicted']} | {w['p_true']:.4f} | {w['loss']:.3f} |" for w in worst]
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{k}]({p.name})" for k, p in figures.items())]
    atomic_write(path, "\n".join(lines) + "\n")


def write_predictions(path: Path, samples: Samples, probs: np.ndarray, classes: Sequence[str], root: Path | None,
                      threshold: float | None = None) -> None:
    """``predictions.csv``: each image (relative to the data root), its true and predicted class and probabilities."""
    rows = [{"file": relative_path(file, root) if root else str(file), "true": classes[label],
             "predicted": classes[predicted], **{f"p_{c}": f"{v:.6f}" for c, v in zip(classes, p)}}
            for file, label, p, predicted in zip(samples.paths, samples.labels, probs, labels_of(probs, threshold))]
    write_csv(path, rows, columns=("file", "true", "predicted", *[f"p_{c}" for c in classes]))
