"""Checks on a composed config, so a bad key or value fails before any work with a message naming the setting."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from cellcls.config.schema import GROUPS, SCHEMAS, TOP_LEVEL
from cellcls.config.targets import check_targets, resolve_target
from cellcls.data.normalization import check_normalization
from cellcls.errors import ConfigError, nearest
from cellcls.evaluation.calibration import parse_operating_point
from cellcls.evaluation.metrics import EPOCH_METRICS
from cellcls.models import MODEL_KEYS, MODELS
from cellcls.training.optim import OPTIMIZERS, PARAM_GROUP_KEYS, SCHEDULERS

PRECISIONS = ("auto", "32", "bf16", "16")


def _unknown(path: str, keys: Iterable[str], valid: Sequence[str]) -> None:
    for key in keys:
        if key not in valid:
            full = f"{path}.{key}" if path else key
            near = nearest(full, [f"{path}.{v}" if path else v for v in valid])
            raise ConfigError(f"unknown setting {full!r}{near} (valid keys of {path or 'the config'}: {', '.join(valid)})")


def _signature_keys(target: Callable[..., Any], skip: int = 0) -> list[str]:
    params = list(inspect.signature(target).parameters.values())[skip:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys that no schema or configured class knows (typos, ``+`` additions), naming the nearest key, and
    any ``_target_`` that is not a class cellcls creates (:mod:`cellcls.config.targets`)."""
    check_targets(cfg)
    _unknown("", [k for k in cfg if k != "hydra"], [*TOP_LEVEL, *GROUPS])
    for path, schema in SCHEMAS.items():
        node = OmegaConf.select(cfg, path)
        if node is not None:
            _unknown(path, node.keys(), [f.name for f in fields(schema)])
    model = str(cfg.model.name)
    if model in MODELS:
        _unknown("model", cfg.model.keys(), [*MODEL_KEYS, *_signature_keys(MODELS[model], skip=3)])
    optim = str(cfg.optim.name)
    if optim in OPTIMIZERS:
        _unknown("optim", cfg.optim.keys(), ["name", *PARAM_GROUP_KEYS, *_signature_keys(OPTIMIZERS[optim], skip=1)])
    if str(cfg.scheduler.name) in SCHEDULERS:
        _unknown("scheduler", cfg.scheduler.keys(), ["name", *SCHEDULERS[str(cfg.scheduler.name)]])
    for group, skip in (("callbacks", 0), ("logger", 1)):  # loggers take the run folder first
        for name, node in (cfg.get(group) or {}).items():
            if node is None:
                continue
            if "_target_" not in node:
                raise ConfigError(f"{group}.{name} needs a _target_ (the class to create), got {OmegaConf.to_container(node)}")
            try:
                target = resolve_target(str(node._target_), group)
            except ConfigError:
                raise
            except Exception as exc:  # Hydra raises its own error types for unimportable names
                raise ConfigError(f"{group}.{name}._target_={node._target_!r} cannot be imported: {exc}") from exc
            _unknown(f"{group}.{name}", [k for k in node if k != "_target_"], _signature_keys(target.__init__, skip=1 + skip))


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if str(value) not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first unknown key or setting outside its allowed values."""
    _choice("model.name", cfg.model.name, sorted(MODELS))
    _choice("optim.name", cfg.optim.name, sorted(OPTIMIZERS))
    _choice("scheduler.name", cfg.scheduler.name, list(SCHEDULERS))
    check_keys(cfg)
    t = cfg.trainer
    _positive_int("trainer.max_epochs", t.max_epochs)
    device = str(t.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"trainer.device={device!r} is not valid; allowed values: auto, cpu, cuda, cuda:<index>")
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.strategy", t.strategy, ("auto", "ddp", "none"))
    _choice("trainer.monitor", t.monitor, EPOCH_METRICS)
    _choice("trainer.monitor_mode", t.monitor_mode, ("auto", "min", "max"))
    _choice("trainer.on_nonfinite", t.on_nonfinite, ("stop", "skip_batch"))
    _positive_int("trainer.max_skipped_batches", t.max_skipped_batches, minimum=0)
    if t.gradient_clip is not None and not t.gradient_clip > 0:
        raise ConfigError(f"trainer.gradient_clip must be a positive number or null, got {t.gradient_clip!r}")
    _positive_int("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    if t.get("ema_decay") is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"trainer.ema_decay must be between 0 and 1 (e.g. 0.999) or null, got {t.ema_decay!r}")
    _choice("class_weights", cfg.class_weights, ("none", "balanced"))
    smoothing = cfg.get("label_smoothing") or 0.0
    if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ConfigError(f"label_smoothing must be a number in [0, 1) (e.g. 0.1), got {smoothing!r}")
    if isinstance(cfg.optim.lr, bool) or not isinstance(cfg.optim.lr, (int, float)) or not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr must be a positive number (e.g. 1e-3), got {cfg.optim.lr!r}: at 0 nothing learns")
    if cfg.get("cv") is not None:
        from cellcls.training.crossval import check_cv

        check_cv(cfg)
    if cfg.get("operating_point"):
        parse_operating_point(str(cfg.operating_point))
    ds = cfg.dataset
    _positive_int("dataset.batch_size", ds.batch_size)
    _positive_int("dataset.num_workers", ds.num_workers, minimum=0)
    _choice("dataset.channels", ds.channels, ("1", "3"))
    size = list(ds.image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"dataset.image_size must be [height, width] in pixels, got {size!r}")
    if ds.classes is not None and len(ds.classes) < 2:
        raise ConfigError(f"dataset.classes must name at least 2 classes, got {list(ds.classes)!r}")
    check_normalization(ds.mean, ds.std, int(ds.channels))
    _choice("dataset.split_by", ds.split_by, ("image", "patient", "duplicates"))
    _choice("dataset.leakage_check", ds.leakage_check, ("auto", "duplicates", "off"))
    sources = [k for k in ("group_pattern", "group_tag") if ds.get(k)] + (
        ["table.group"] if ds.get("table") is not None and ds.table.group else [])
    if len(sources) > 1:
        raise ConfigError(f"each image's patient comes from one setting; set only one of "
                          f"{', '.join('dataset.' + k for k in sources)}")
    if ds.split_by == "patient" and not sources:
        raise ConfigError("dataset.split_by=patient needs to know each image's patient: dataset.group_pattern (a regex "
                          "whose first group is the patient id in the file name), dataset.group_tag (a DICOM keyword "
                          "such as PatientID) or dataset.table.group (a table column)")
    table = ds.get("table")
    if table is not None and table.label_map is not None:
        mapping = OmegaConf.to_container(table.label_map) if OmegaConf.is_config(table.label_map) else table.label_map
        if not isinstance(mapping, dict) or not all(v is None or isinstance(v, str) for v in mapping.values()):
            raise ConfigError("dataset.table.label_map must map raw labels to class names (or null to drop their "
                              f"rows), e.g. {{melanoma: malignant, nevus: benign}}; got {mapping!r}")
    if ds.get("dicom_window") is not None:
        window = list(ds.dicom_window)
        if len(window) != 2 or not window[1] > 0:
            raise ConfigError(f"dataset.dicom_window must be [centre, width] with width > 0, got {window!r}")
    if ds.group_pattern:
        try:
            re.compile(str(ds.group_pattern))
        except re.error as exc:
            raise ConfigError(f"dataset.group_pattern={ds.group_pattern!r} is not a valid regex: {exc}") from None
    for key in ("val_fraction", "test_fraction"):
        if not 0 <= ds[key] < 1:
            raise ConfigError(f"dataset.{key} must be a number in [0, 1), got {ds[key]!r}")


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
