"""Fitting a trained model's decision rule afresh on its validation split, without training again: the temperature
(``calibrate``), the operating point and the conformal prediction sets, written into ``best.pt`` as training's
``calibrate=true operating_point=... conformal=...`` would have written them."""

from __future__ import annotations

import logging
from pathlib import Path

from cellcls.errors import ConfigError
from cellcls.evaluation.evaluate import load_data
from cellcls.infra.checkpoint import load_checkpoint, save_checkpoint
from cellcls.infra.run_folder import BEST
from cellcls.infra.run_lock import run_folder_lock
from cellcls.models.trained import load_model
from cellcls.scoring.calibration import fit_decision
from cellcls.scoring.heads import Decision
from cellcls.scoring.inference import run_inference

log = logging.getLogger(__name__)


def recalibrate(checkpoint: str | Path, calibrate: bool = False, operating_point: str | None = None,
                conformal: float | None = None, device: str = "auto") -> Decision:
    """Fit the decision rule on the checkpoint's own validation split (rebuilt as it trained) and store it in the
    checkpoint file; returns it. The weights and everything else in the file stay as they were."""
    if not (calibrate or operating_point or conformal is not None):
        raise ConfigError("nothing to fit: give calibrate=true, operating_point=<kind>:<level> or conformal=<level>")
    loaded = load_model(checkpoint, device, tta="none")
    found = load_data(loaded, "val", None)
    logits, targets = run_inference(loaded.model, found.loader, loaded.device)
    decision = fit_decision(logits, targets, calibrate, operating_point, conformal=conformal)
    with run_folder_lock(loaded.run.root):  # not while a training run writes this folder's checkpoints
        ckpt = load_checkpoint(loaded.path, BEST)
        ckpt.calibration = decision.to_dict()
        save_checkpoint(ckpt, loaded.path)
    log.info("decision rule of %s refitted on %s", loaded.path, decision.fitted_on)
    return decision
