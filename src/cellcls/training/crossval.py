"""Cross-validation: ``cv.folds=K`` trains K ordinary runs, run k testing on fold k (grouped and stratified, see
:func:`cellcls.data.splits.cross_validation_fold`), then pools their out-of-fold predictions into one table.

The run folder holds ``fold_1/`` ... ``fold_K/`` (complete run folders: evaluate, export and serve work on each),
``cv_folds.csv`` (each fold's test scores, their mean and standard deviation, and the pooled out-of-fold scores),
``cv_predictions.csv``, ``cv_metrics.json`` (pooled metrics with 95% intervals, over patients or duplicate clusters
where known), ``cv_report.md`` and ``result.json``, whose ``best`` is the cross-validated score of the monitored
metric (the mean over folds): what a sweep (``--multirun``, Optuna) optimises.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.datamodule import resolve_root
from cellcls.data.layouts import scan
from cellcls.data.samples import Samples
from cellcls.data.leakage import interval_groups
from cellcls.data.findings import require_single_label
from cellcls.errors import ConfigError, DataError
from cellcls.metric_names import TEST_METRICS, held_out_score, metric_mode
from cellcls.scoring.conformal import cross_fold_sets, method_for, set_summary
from cellcls.scoring.metrics import evaluate_predictions, prediction_set_metrics
from cellcls.evaluation.report import metric_rows, prediction_set_lines
from cellcls.infra.run_folder import RunFolder, atomic_write, write_csv, write_json
from cellcls.training.fit import conformal_level

log = logging.getLogger(__name__)
TrainFn = Callable[[DictConfig, Path, Sequence[str]], dict[str, Any]]


def check_cv(cfg: DictConfig) -> None:
    folds, fold = int(cfg.cv.folds), cfg.cv.fold
    if folds == 1 or folds < 0:
        raise ConfigError(f"cv.folds={folds}: use 0 (no cross-validation) or at least 2 folds")
    if fold is not None and not 0 <= int(fold) < max(folds, 1):
        raise ConfigError(f"cv.fold={fold} must be between 0 and cv.folds - 1 = {folds - 1} (it is set per fold)")
    if folds:
        require_single_label(cfg.dataset, "cross-validation (cv.folds)")
        held_out_score(str(cfg.trainer.monitor))


def cross_validate(cfg: DictConfig, run_dir: Path, overrides: Sequence[str], train_fold: TrainFn) -> dict[str, Any]:
    """Train every fold (a fold already finished in ``run_dir`` is kept), then pool and write the tables."""
    folds = int(cfg.cv.folds)
    run = RunFolder(run_dir)
    metric = held_out_score(str(cfg.trainer.monitor))
    per_fold = []
    for k in range(folds):
        folder = run.fold(k)
        if _finished(folder):
            log.info("cross-validation fold %d/%d: already trained in %s", k + 1, folds, folder.root)
        else:
            log.info("cross-validation fold %d/%d -> %s", k + 1, folds, folder.root)
            fold_cfg = OmegaConf.create(OmegaConf.to_container(cfg))
            fold_cfg.cv.fold = k
            train_fold(fold_cfg, folder.root, [*overrides, f"cv.fold={k}"])
        per_fold.append(json.loads(folder.test_metrics.read_text()))
    predictions = _pooled_predictions(run, folds)
    classes = list(per_fold[0].get("classes") or _classes(run.fold(0)))
    samples, y, probs = _as_arrays(predictions, classes, cfg)
    groups = interval_groups(typed(cfg.dataset, DatasetConfig), samples, _scanned(cfg))
    pooled = evaluate_predictions(y, probs, classes, None, seed=int(cfg.seed), groups=groups)
    level = conformal_level(cfg)
    if level is not None:
        pooled["prediction_sets"] = _out_of_fold_sets(predictions, y, probs, classes, level, groups)
    rows = [{"fold": k + 1, "images": m["num_images"], **{key: m.get(key) for key in TEST_METRICS}}
            for k, m in enumerate(per_fold)]
    for name, fn in (("mean", statistics.fmean), ("sd", statistics.stdev)):
        rows.append({"fold": name, "images": sum(m["num_images"] for m in per_fold),
                     **{key: _over_folds(fn, [m.get(key) for m in per_fold]) for key in TEST_METRICS}})
    rows.append({"fold": "pooled", "images": len(y), "loss": None,
                 **{key: pooled[key]["value"] for key in TEST_METRICS if key in pooled}})
    write_csv(run.cv_folds, rows, columns=("fold", "images", *TEST_METRICS))
    write_csv(run.cv_predictions, predictions)
    score = rows[folds][metric]
    summary = {"status": "ok", "overrides": list(overrides), "monitor": f"cv_{metric}",
               "mode": metric_mode(metric), "best": score, "folds": folds, "per_fold": rows[:folds],
               "mean": rows[folds], "sd": rows[folds + 1], "pooled": pooled}
    write_json(run.cv_metrics, {"folds": folds, "metric": metric, "per_fold": rows[:folds], "mean": rows[folds],
                                "sd": rows[folds + 1], "pooled": pooled})
    atomic_write(run.cv_report, _report(rows, pooled, folds, metric))
    write_json(run.result, {k: v for k, v in summary.items() if k != "pooled"})
    log.info("cross-validation (%d folds): %s %.4f +/- %.4f over folds; pooled out-of-fold accuracy %.4f (%s)",
             folds, metric, score, rows[folds + 1][metric] or 0.0, pooled["accuracy"]["value"], run.cv_folds)
    sets = pooled.get("prediction_sets")
    if sets:
        log.info("out-of-fold prediction sets aiming at %g: coverage %.4f (95%% CI %.4f - %.4f), mean size %.2f, "
                 "folds %s", sets["level"], sets["coverage"]["value"], *sets["coverage"]["ci95"], sets["mean_size"],
                 ", ".join(f"{r['coverage']:.3f}" for r in sets["per_fold"]))
    return summary


def _out_of_fold_sets(rows: list[dict[str, Any]], y: np.ndarray, probs: np.ndarray, classes: list[str],
                      level: float, groups: Sequence[str] | None) -> dict[str, Any]:
    """Prediction sets over the pooled out-of-fold predictions, each fold's threshold fitted on the other folds (see
    :func:`cross_fold_sets`): coverage with its grouped interval, per class and per fold. Each row gets its ``set``."""
    folds = np.array([int(r["fold"]) for r in rows])
    members = cross_fold_sets(probs, y, folds, level)
    for row, member in zip(rows, members):
        row["set"] = "|".join(c for c, keep in zip(classes, member) if keep)
    per_fold = [{"fold": int(k), "images": int((folds == k).sum()), **set_summary(members[folds == k], y[folds == k])}
                for k in np.unique(folds)]
    return {**prediction_set_metrics(y, members, classes, level, groups), "method": method_for(len(classes)),
            "fitted_on": "the other folds' out-of-fold predictions (each fold's own threshold)", "per_fold": per_fold}


def _finished(folder: RunFolder) -> bool:
    if not (folder.result.is_file() and folder.test_metrics.is_file() and folder.test_predictions.is_file()):
        return False
    return json.loads(folder.result.read_text()).get("status") == "ok"


def _over_folds(fn: Callable[[list[float]], float], values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return fn(numbers) if len(numbers) >= 2 or (fn is statistics.fmean and numbers) else None


def _pooled_predictions(run: RunFolder, folds: int) -> list[dict[str, Any]]:
    rows = []
    for k in range(folds):
        with open(run.fold(k).test_predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows += [{"fold": k + 1, **r} for r in csv.DictReader(fh)]
    return rows


def _classes(folder: RunFolder) -> list[str]:
    with open(folder.test_predictions, newline="") as fh:
        return [c.removeprefix("p_") for c in (csv.DictReader(fh).fieldnames or []) if c.startswith("p_")]


def _scanned(cfg: DictConfig) -> dict[str, Samples]:
    ds = typed(cfg.dataset, DatasetConfig)
    return scan(ds, resolve_root(ds)).splits


def _as_arrays(rows: list[dict[str, Any]], classes: list[str], cfg: DictConfig) -> tuple[Samples, np.ndarray, np.ndarray]:
    root = resolve_root(cfg.dataset)
    try:
        y = np.array([classes.index(r["true"]) for r in rows])
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    except (KeyError, ValueError) as exc:
        raise DataError(f"a fold's test_predictions.csv does not match the classes {classes}: {exc}") from exc
    return Samples([root / r["file"] for r in rows], y.tolist()), y, probs


def _report(rows: list[dict[str, Any]], pooled: dict[str, Any], folds: int, metric: str) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# Cross-validation, {folds} folds", "",
             (f"Cross-validated score (the mean over folds of each fold's test {metric}): {cell(rows[folds][metric])} "
              f"(sd {cell(rows[folds + 1][metric])})."), "",
             "| fold | images | " + " | ".join(TEST_METRICS) + " |", "|---" * (len(TEST_METRICS) + 2) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in ("fold", "images", *TEST_METRICS)) + " |" for r in rows]
    lines += ["", f"## Pooled out-of-fold predictions ({pooled['num_images']} images)", "",
              "| metric | value | 95% CI |", "|---|---|---|", *metric_rows(pooled), "",
              f"Intervals: {pooled['interval']['method']}.", "",
              "Each image is scored by the one model that did not train on it: cv_predictions.csv.",
              *prediction_set_lines(pooled.get("prediction_sets"))]
    return "\n".join(lines) + "\n"
