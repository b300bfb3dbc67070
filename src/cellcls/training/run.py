"""One training job from a composed config: resume resolution, validation, fit, and the run's status when it does
not finish. Used by ``python -m cellcls.train`` and ``cellcls.train(...)`` alike."""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cellcls.infra.checkpoint import load_checkpoint, require_resumable
from cellcls.config.checks import apply_overrides
from cellcls.training.validate import validate
from cellcls.config.schema import GROUPS
from cellcls.errors import (
    DISK_ERRORS,
    TrainingDiverged,
    TrainingInterrupted,
    describe_os_error,
)
from cellcls.infra.run_folder import RunFolder
from cellcls.training.callbacks import Callback
from cellcls.training.crossval import cross_validate
from cellcls.training.fit import fit
from cellcls.infra.run_lock import run_folder_lock
from cellcls.training.sweep import write_status

log = logging.getLogger("cellcls.train")


def resume_config(stored: dict, overrides: Sequence[str]) -> DictConfig:
    """The config of a resumed run: the checkpoint's, with this command's ``key=value`` overrides on top.

    Group choices (``model=...``) cannot change a run half-way and are ignored with a warning.
    """
    cfg = OmegaConf.create(stored)
    for line in apply_overrides(cfg, overrides, skip=(*GROUPS, "experiment")):
        log.warning("ignored on resume: %s (the checkpoint's setting is kept)", line)
    return cfg


def train(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the run's summary (best value, test metrics).
    ``callbacks`` join the configured ones (a search's pruning callback).

    A run that does not finish says why in ``result.json`` (``failed``, ``diverged``, ``interrupted``) and raises.
    One run at a time per folder: another run holding ``run_dir`` is refused (:class:`RunFolderInUse`) before
    anything is written there.
    """
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 holds the folder for all its ranks
        return _train(cfg, run_dir, overrides, callbacks)
    with run_folder_lock(run_dir):
        return _train(cfg, run_dir, overrides, callbacks)


def _train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str], callbacks: Sequence[Callback]) -> dict[str, Any]:
    if int(cfg.cv.folds) >= 2 and cfg.cv.fold is None:  # cross-validation: one ordinary run per fold
        validate(cfg)
        return cross_validate(cfg, run_dir, overrides, train)
    try:
        resume = None
        if cfg.trainer.resume == "auto":  # this folder's last checkpoint, if an earlier attempt left one
            last = RunFolder(run_dir).last_checkpoint
            cfg.trainer.resume = str(last) if last.is_file() else None
        if cfg.trainer.resume:
            resume = load_checkpoint(str(cfg.trainer.resume))
            require_resumable(resume)
            cfg = resume_config(resume.config, overrides)
            cfg.trainer.resume = str(resume.path)
        validate(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = fit(cfg, run_dir, resume, list(overrides), callbacks)
    except TrainingInterrupted as exc:
        write_status(run_dir, "interrupted", list(overrides), str(exc))
        exc.pass_on()  # under submitit: requeue (and exit)
        raise
    except TrainingDiverged as exc:
        write_status(run_dir, "diverged", list(overrides), str(exc))
        raise
    except Exception as exc:
        why = describe_os_error(exc) if isinstance(exc, OSError) and exc.errno in DISK_ERRORS else str(exc)
        write_status(run_dir, "failed", list(overrides), f"{type(exc).__name__}: {why}", traceback.format_exc())
        raise
    log.info("run folder: %s", run_dir)
    return summary


def job_device(cfg: DictConfig, job_num: int) -> DictConfig:
    """With several GPUs and ``trainer.device=auto``, parallel sweep jobs take one GPU each (round-robin)."""
    count = torch.cuda.device_count()
    if str(cfg.trainer.device) == "auto" and count > 1:
        cfg.trainer.device = f"cuda:{job_num % count}"
    return cfg
