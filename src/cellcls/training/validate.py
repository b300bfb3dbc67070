"""The whole check of a training config: the schema's own checks, then each registry's check of its section.

It sits above every registry it calls, so that none of them, and not the config layer, needs to know the others.
"""

from __future__ import annotations

from omegaconf import DictConfig

from cellcls.config.checks import check_choices, check_keys, check_values
from cellcls.data.normalization import check_normalization
from cellcls.models import check_model_config
from cellcls.scoring.calibration import parse_operating_point
from cellcls.scoring.conformal import check_level
from cellcls.scoring.ood import check_ood_level
from cellcls.training.crossval import check_cv
from cellcls.training.optim import check_optim_config, check_scheduler_config


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first unknown key or setting outside its allowed values."""
    check_model_config(cfg.model)
    check_optim_config(cfg.optim)
    check_scheduler_config(cfg.scheduler)
    check_keys(cfg)
    check_choices(cfg)
    check_values(cfg)
    check_normalization(cfg.dataset.mean, cfg.dataset.std, int(cfg.dataset.channels))
    if cfg.get("cv") is not None:
        check_cv(cfg)
    if cfg.get("operating_point"):
        parse_operating_point(str(cfg.operating_point))
    if cfg.get("conformal") is not None:
        check_level(cfg.conformal)
    if cfg.get("ood") is not None:
        check_ood_level(cfg.ood)
