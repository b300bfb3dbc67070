"""``python -m cellcls.train [overrides]``: train one model from the Hydra config in ``configs/``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cellcls.checkpoint import load_checkpoint
from cellcls.config import apply_overrides, validate
from cellcls.errors import ConfigError, DataError
from cellcls.paths import config_dir
from cellcls.trainer import Trainer

log = logging.getLogger("cellcls.train")

GROUPS = ("dataset", "model", "optim", "scheduler", "augment", "trainer", "logger", "experiment")


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
    summary = Trainer(cfg, run_dir, resume).fit()
    log.info("run folder: %s", run_dir)
    return float(summary["best"])


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    try:
        return train(cfg, Path(hc.runtime.output_dir), hc.overrides.task)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise  # the launcher records the failed job and the sweep goes on
        log.error("%s", exc)
        print(f"cellcls: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
