"""After the last epoch: best.pt's decision rule fitted on validation (``calibrate``, ``operating_point``) and its
test scores, written to ``test_metrics.json``."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from cellcls.evaluation.multilabel import fit_rule, score_split, write_finding_predictions
from cellcls.infra.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellcls.scoring.calibration import (
    brier_score,
    expected_calibration_error,
    fit_decision,
)
from cellcls.scoring.conformal import set_summary
from cellcls.scoring.inference import run_inference, score
from cellcls.data.leakage import interval_groups
from cellcls.data.samples import Samples
from cellcls.metric_names import HEADLINE
from cellcls.scoring.metrics import evaluate_predictions, sensitivity, specificity
from cellcls.evaluation.report import write_predictions
from cellcls.scoring.heads import Decision, probabilities
from cellcls.scoring.multilabel import finding_probabilities
from cellcls.infra.run_folder import BEST, write_json
from cellcls.training.build import Job

log = logging.getLogger(__name__)


def _logits(job: Job, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    rt = job.runtime
    return run_inference(job.net, job.data.loaders[split], rt.device, rt.amp_dtype, rt.memory_format)


def test_intervals(job: Job, samples: Samples, y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The headline metrics' 95% intervals as ``evaluate`` computes them (over the test split's patients where they
    are known), for the values ``test_metrics.json`` holds (the arg-max class)."""
    groups = interval_groups(job.cfg.dataset, samples, job.data.splits)
    scored = evaluate_predictions(y, probs, job.data.classes, None, seed=int(job.cfg.seed), groups=groups)
    return {"ci95": {k: scored[k]["ci95"] for k in HEADLINE if k in scored}, "interval": scored["interval"]}


def calibrate_and_test(job: Job, calibrate: bool, operating_point: str | None,
                       conformal: float | None = None) -> dict[str, Any] | None:
    """Load best.pt into the job; fit and store its decision rule (temperature, threshold, prediction sets) when
    asked; score it on the test split."""
    if not job.run.best_checkpoint.is_file():
        return None
    best = load_checkpoint(job.run.best_checkpoint, BEST)
    job.net.load_state_dict(best.model)
    # the default layout, as `cellcls.evaluate` runs it, so its numbers reproduce these exactly
    job.net.to(memory_format=torch.contiguous_format)
    job.runtime.memory_format = torch.contiguous_format
    if job.data.multilabel:
        return _test_findings(job, best, operating_point)
    decision = Decision()
    if calibrate or operating_point or conformal is not None:
        decision = fit_decision(*_logits(job, "val"), calibrate, operating_point, conformal=conformal)
        best.calibration = decision.to_dict()
        save_checkpoint(best, job.run.best_checkpoint)
        log.info("decision rule fitted on %s: temperature %.3f%s%s", decision.fitted_on, decision.temperature,
                 f", threshold {decision.threshold:.4f} for {operating_point}" if decision.threshold is not None else "",
                 f", {decision.set_method} prediction sets for coverage {conformal:g} (score threshold "
                 f"{decision.set_threshold:.4f})" if decision.has_sets else "")
    if "test" not in job.data.loaders:
        return None
    logits, targets = _logits(job, "test")
    test = score(job.net, logits, targets)
    result: dict[str, Any] = {
        "checkpoint": "checkpoints/best.pt", "epoch": best.epoch, "split": "test",
        "num_images": len(job.data.splits["test"]), "loss": test.loss, "accuracy": test.accuracy,
        "balanced_accuracy": test.balanced_accuracy,
        "roc_auc": test.roc_auc if math.isfinite(test.roc_auc) else None,  # undefined with one class
    }
    if math.isfinite(test.loss):
        y = targets.numpy()
        probs = decision.probabilities(logits).numpy()
        result["ece"], result["brier"] = expected_calibration_error(y, probs), brier_score(y, probs)
        result["decision"] = decision.to_dict()
        if decision.threshold is not None:
            predicted = decision.labels(probs)
            result["operating_point"] = {"threshold": decision.threshold, "sensitivity": sensitivity(y, predicted),
                                         "specificity": specificity(y, predicted),
                                         "accuracy": float((predicted == y).mean())}
        members = decision.sets(probs)
        if members is not None:
            result["prediction_sets"] = {"level": decision.set_level, **set_summary(members, y)}
    samples = job.data.splits["test"]
    if math.isfinite(test.loss) and len(samples) == len(targets):
        result.update(test_intervals(job, samples, targets.numpy(), probabilities(logits).numpy()))
    write_json(job.run.test_metrics, result)
    if len(samples) == len(targets):  # uncached files that failed to decode mid-pass leave no row to name
        write_predictions(job.run.test_predictions, samples, decision.probabilities(logits).numpy(), job.data.classes,
                          job.data.root, decision.threshold)
    log.info("test (best epoch %d): loss %.4f  acc %.4f  balanced acc %.4f  ROC-AUC %.4f",
             best.epoch, test.loss, test.accuracy, test.balanced_accuracy, test.roc_auc)
    if "operating_point" in result:
        op = result["operating_point"]
        log.info("test at the operating point %s (threshold %.4f): sensitivity %.4f  specificity %.4f",
                 operating_point, op["threshold"], op["sensitivity"], op["specificity"])
    return result


def _test_findings(job: Job, best: Checkpoint, operating_point: str | None) -> dict[str, Any] | None:
    """A multi-label best.pt: each finding's threshold fitted on validation (Youden's J, or ``operating_point``)
    and stored; the test split scored per finding at them."""
    val_logits, val_targets = _logits(job, "val")
    rule = fit_rule(val_targets.numpy(), finding_probabilities(val_logits).numpy(), operating_point)
    best.calibration = rule.to_dict()
    save_checkpoint(best, job.run.best_checkpoint)
    if "test" not in job.data.loaders:
        return None
    logits, targets = _logits(job, "test")
    test = score(job.net, logits, targets)
    samples, probs = job.data.splits["test"], finding_probabilities(logits).numpy()
    whole = len(samples) == len(targets)  # uncached files that failed to decode mid-pass leave no row to name
    groups = interval_groups(job.cfg.dataset, samples, job.data.splits) if whole else None
    result: dict[str, Any] = {
        "checkpoint": "checkpoints/best.pt", "epoch": best.epoch, "split": "test", "num_images": len(targets),
        "loss": test.loss, "accuracy": test.accuracy, "balanced_accuracy": test.balanced_accuracy,
        "roc_auc": test.roc_auc if math.isfinite(test.roc_auc) else None,
        **score_split(targets.numpy(), probs, job.data.classes, rule, groups, f"test (best epoch {best.epoch})")}
    write_json(job.run.test_metrics, result)
    if whole:
        write_finding_predictions(job.run.test_predictions, samples, probs, job.data.classes, job.data.root, rule)
    return result
