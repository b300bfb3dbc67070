"""``python -m cellcls.train [overrides]``: train one model from the Hydra config in ``configs/``."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cellcls.checkpoint import load_checkpoint
from cellcls.config import apply_overrides, validate
from cellcls.distributed import rank_run_dir
from cellcls.errors import ConfigError, DataError
from cellcls.paths import config_dir
from cellcls.sweep import direction, write_result
from cellcls.trainer import Trainer

log = logging.getLogger("cellcls.train")

GROUPS = ("dataset", "model", "optim", "scheduler", "augment", "trainer", "logger", "experiment", "hparams_search")


def resume_config(stored: dict, overrides: Sequence[str]) -> DictConfig:
    """The config of a resumed run: the checkpoint's, with this command's ``key=value`` overrides on top.

    Group choices (``model=...``) cannot change a run half-way and are ignored with a warning.
    """
    cfg = OmegaConf.create(stored)
    for line in apply_overrides(cfg, overrides, skip=GROUPS):
        log.warning("ignored on resume: %s (the checkpoint's setting is kept)", line)
    return cfg


def train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> float:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the best value of the monitored metric."""
    resume = None
    if cfg.trainer.get("resume"):
        resume = load_checkpoint(str(cfg.trainer.resume))
        cfg = resume_config(resume["config"], overrides)
        cfg.trainer.resume = str(resume["path"])
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, resume)
    summary = trainer.fit()
    if trainer.is_main:
        write_result(run_dir, {"status": "ok", "overrides": list(overrides), "mode": trainer.mode, **summary})
        log.info("run folder: %s", run_dir)
    return float(summary["best"])


def job_device(cfg: DictConfig, job_num: int) -> DictConfig:
    """With several GPUs and ``trainer.device=auto``, parallel sweep jobs take one GPU each (round-robin)."""
    count = torch.cuda.device_count()
    if str(cfg.trainer.device) == "auto" and count > 1:
        cfg.trainer.device = f"cuda:{job_num % count}"
    return cfg


OmegaConf.register_new_resolver("cellcls_direction", direction, replace=True)
OmegaConf.register_new_resolver("cellcls_rank_dir", rank_run_dir, replace=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if int(os.environ.get("RANK", "0")) > 0 and run_dir.name.startswith("cellcls-rank"):
        atexit.register(shutil.rmtree, run_dir, True)  # a non-zero torchrun rank's throw-away Hydra folder
    if hc.mode == RunMode.MULTIRUN:
        # one failing job is recorded and returns NaN (Optuna marks the trial failed); the sweep goes on
        try:
            return train(job_device(cfg, hc.job.num), run_dir, overrides)
        except Exception as exc:
            log.exception("job %s failed: %s", hc.job.num, exc)
            write_result(run_dir, {"status": "failed", "overrides": overrides, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()})
            return float("nan")
    try:
        return train(cfg, run_dir, overrides)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        log.error("%s", exc)
        print(f"cellcls: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
