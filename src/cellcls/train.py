"""``python -m cellcls.train [overrides]``: train one model from the Hydra config in ``configs/``."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import traceback
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cellcls.checkpoint import load_checkpoint, require_resumable
from cellcls.config import check_command_line
from cellcls.config.checks import apply_overrides, validate
from cellcls.config.schema import GROUPS
from cellcls.errors import ConfigError, DataError
from cellcls.paths import config_dir
from cellcls.training.distributed import rank_run_dir
from cellcls.training.fit import fit
from cellcls.training.sweep import direction, write_failure

log = logging.getLogger("cellcls.train")


def resume_config(stored: dict, overrides: Sequence[str]) -> DictConfig:
    """The config of a resumed run: the checkpoint's, with this command's ``key=value`` overrides on top.

    Group choices (``model=...``) cannot change a run half-way and are ignored with a warning.
    """
    cfg = OmegaConf.create(stored)
    for line in apply_overrides(cfg, overrides, skip=(*GROUPS, "experiment", "hparams_search")):
        log.warning("ignored on resume: %s (the checkpoint's setting is kept)", line)
    return cfg


def train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the run's summary (best value, test metrics)."""
    resume = None
    if cfg.trainer.resume:
        resume = load_checkpoint(str(cfg.trainer.resume))
        require_resumable(resume)
        cfg = resume_config(resume.config, overrides)
        cfg.trainer.resume = str(resume.path)
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = fit(cfg, run_dir, resume, list(overrides))
    log.info("run folder: %s", run_dir)
    return summary


def job_device(cfg: DictConfig, job_num: int) -> DictConfig:
    """With several GPUs and ``trainer.device=auto``, parallel sweep jobs take one GPU each (round-robin)."""
    count = torch.cuda.device_count()
    if str(cfg.trainer.device) == "auto" and count > 1:
        cfg.trainer.device = f"cuda:{job_num % count}"
    return cfg


OmegaConf.register_new_resolver("cellcls_direction", direction, replace=True)
OmegaConf.register_new_resolver("cellcls_rank_dir", rank_run_dir, replace=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if int(os.environ.get("RANK", "0")) > 0 and run_dir.name.startswith("cellcls-rank"):
        atexit.register(shutil.rmtree, run_dir, True)  # a non-zero torchrun rank's throw-away Hydra folder
    if hc.mode == RunMode.MULTIRUN:
        # one failing job is recorded and returns NaN (Optuna marks the trial failed); the sweep goes on
        try:
            return float(train(job_device(cfg, hc.job.num), run_dir, overrides)["best"])
        except Exception as exc:
            log.exception("job %s failed: %s", hc.job.num, exc)
            write_failure(run_dir, overrides, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            return float("nan")
    try:
        return float(train(cfg, run_dir, overrides)["best"])
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        print(f"cellcls: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Check the command line's keys (naming the nearest valid key for a typo), then run Hydra."""
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as exc:
        print(f"cellcls: error: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


class _CallableModule(types.ModuleType):
    """This module shares its name with the Python API's ``cellcls.train(overrides)``: once it is imported,
    ``cellcls.train`` is this module, so calling it calls the API."""

    def __call__(self, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> Any:
        from cellcls.api import train as api_train

        return api_train(overrides, run_dir)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
