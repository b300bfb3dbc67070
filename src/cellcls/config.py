"""Checks on a composed config, so a bad value fails before any work with a message naming the setting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from cellcls.data.normalization import check_normalization
from cellcls.errors import ConfigError
from cellcls.models import MODELS
from cellcls.optim import OPTIMIZERS, SCHEDULERS

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy")
PRECISIONS = ("auto", "32", "bf16", "16")


def _choice(name: str, value: Any, allowed: tuple[str, ...] | list[str]) -> None:
    if str(value) not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first setting outside its allowed values."""
    t = cfg.trainer
    _positive_int("trainer.max_epochs", t.max_epochs)
    device = str(t.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"trainer.device={device!r} is not valid; allowed values: auto, cpu, cuda, cuda:<index>")
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.strategy", t.get("strategy", "auto"), ("auto", "ddp", "none"))
    _choice("trainer.monitor", t.monitor, METRICS)
    _choice("trainer.monitor_mode", t.monitor_mode, ("auto", "min", "max"))
    _positive_int("trainer.early_stopping.patience", t.early_stopping.patience, minimum=0)
    _choice("class_weights", cfg.class_weights, ("none", "balanced"))
    _choice("model.name", cfg.model.name, sorted(MODELS))
    _choice("optim.name", cfg.optim.name, sorted(OPTIMIZERS))
    _choice("scheduler.name", cfg.scheduler.name, list(SCHEDULERS))
    if not isinstance(cfg.optim.lr, (int, float)) or cfg.optim.lr < 0:
        raise ConfigError(f"optim.lr must be a number >= 0, got {cfg.optim.lr!r}")
    ds = cfg.dataset
    _positive_int("dataset.batch_size", ds.batch_size)
    _positive_int("dataset.num_workers", ds.num_workers, minimum=0)
    _choice("dataset.channels", ds.channels, ("1", "3"))
    size = list(ds.image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"dataset.image_size must be [height, width] in pixels, got {size!r}")
    if ds.get("classes") is not None and len(ds.classes) < 2:
        raise ConfigError(f"dataset.classes must name at least 2 classes, got {list(ds.classes)!r}")
    check_normalization(ds.get("mean"), ds.get("std"), int(ds.channels))
    _choice("dataset.split_by", ds.get("split_by", "image"), ("image", "patient"))
    if ds.get("split_by") == "patient" and not ds.get("group_pattern"):
        raise ConfigError("dataset.split_by=patient needs dataset.group_pattern, a regex whose first group is the patient id")
    for key in ("val_fraction", "test_fraction"):
        value = ds.get(key, 0) or 0
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"dataset.{key} must be a number in [0, 1), got {value!r}")


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """Apply ``key=value`` overrides (Hydra syntax) to a plain config in place; returns those left out.

    Keys listed in ``skip`` (config group names such as ``model``) and deletions are not applied.
    """
    ignored = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in skip or override.is_delete():
            ignored.append(override.input_line)
            continue
        with open_dict(cfg):
            OmegaConf.update(cfg, key, override.value(), merge=False)
    return ignored
