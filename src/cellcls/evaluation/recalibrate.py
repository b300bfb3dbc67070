"""Fitting a trained model's trust rules afresh, without training again: the decision rule on its validation split
(the temperature, the operating point, the conformal prediction sets) and the out-of-distribution rule (training
features, validation threshold), written into ``best.pt`` as training's ``calibrate=true operating_point=...
conformal=... ood=...`` would have written them."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from cellcls.data.findings import require_single_label
from cellcls.errors import ConfigError
from cellcls.evaluation.evaluate import load_data
from cellcls.infra.checkpoint import load_checkpoint, save_checkpoint
from cellcls.infra.run_folder import BEST
from cellcls.infra.run_lock import run_folder_lock
from cellcls.models.trained import LoadedModel, load_model
from cellcls.scoring.calibration import fit_decision
from cellcls.scoring.heads import Decision
from cellcls.scoring.inference import run_inference
from cellcls.scoring.ood import OODRule, collect_statistics, fit_ood

log = logging.getLogger(__name__)


def recalibrate(checkpoint: str | Path, calibrate: bool = False, operating_point: str | None = None,
                conformal: float | None = None, device: str = "auto", ood: float | None = None,
                lock: bool = True) -> tuple[Decision | None, OODRule | None]:
    """Fit what is asked on the checkpoint's own splits (rebuilt as it trained) and store it in the checkpoint file;
    returns (the decision rule or None, the out-of-distribution rule or None). The weights and everything else in
    the file stay as they were. ``lock=False``: the caller already holds the run folder (training's last step)."""
    decide = bool(calibrate or operating_point or conformal is not None)
    if not decide and ood is None:
        raise ConfigError("nothing to fit: give calibrate=true, operating_point=<kind>:<level>, conformal=<level> "
                          "or ood=<level>")
    loaded = load_model(checkpoint, device, tta="none")
    require_single_label(loaded.config.dataset, "calibrate (temperature, operating point, prediction sets, OOD)")
    decision = None
    if decide:
        logits, targets = run_inference(loaded.model, load_data(loaded, "val", None).loader, loaded.device)
        decision = fit_decision(logits, targets, calibrate, operating_point, conformal=conformal)
    rule = fit_ood_rule(loaded, ood) if ood is not None else None
    with run_folder_lock(loaded.run.root) if lock else nullcontext():  # not while a run writes this folder
        ckpt = load_checkpoint(loaded.path, BEST)
        if decision is not None:
            ckpt.calibration = decision.to_dict()
        if rule is not None:
            ckpt.ood = rule.to_dict()
        save_checkpoint(ckpt, loaded.path)
    log.info("trust rules of %s refitted%s%s", loaded.path, f"; decision on {decision.fitted_on}" if decision else "",
             f"; out-of-distribution threshold {rule.threshold:.4f} at the validation {rule.level:g} quantile"
             if rule else "")
    return decision, rule


def fit_ood_rule(loaded: LoadedModel, level: float) -> OODRule:
    """The out-of-distribution rule of a model: features of its training split (without augmentation) and the
    threshold on its validation split."""
    train = load_data(loaded, "train", None)
    val = load_data(loaded, "val", None)
    train_s = collect_statistics(loaded.model, train.loader, loaded.device)
    val_s = collect_statistics(loaded.model, val.loader, loaded.device)
    return fit_ood(train_s, val_s, level, f"train ({len(train_s)} images), threshold on val ({len(val_s)})")
