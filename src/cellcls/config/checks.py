"""Checks on a composed config that need nothing but the schema, so a bad key or value fails before any work with a
message naming the setting.

The sections whose keys depend on the code they configure are checked by their own registry (``model``:
:func:`cellcls.models.check_model_config`, ``optim`` and ``scheduler``: :mod:`cellcls.training.optim`, the
normalisation: :mod:`cellcls.data.normalization`); :func:`cellcls.training.validate.validate` runs them all. This
module imports nothing of cellcls above the schema.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from cellcls.config.schema import CHANNELS, GROUPS, SCHEMAS, TOP_LEVEL, TOP_LEVEL_CHOICES
from cellcls.config.targets import check_targets, resolve_target
from cellcls.errors import ConfigError, nearest


def check_unknown(path: str, keys: Iterable[str], valid: Sequence[str]) -> None:
    """Refuse the first of ``keys`` not in ``valid``, naming the nearest valid key of ``path``."""
    for key in keys:
        if key not in valid:
            full = f"{path}.{key}" if path else key
            near = nearest(full, [f"{path}.{v}" if path else v for v in valid])
            raise ConfigError(f"unknown setting {full!r}{near} (valid keys of {path or 'the config'}: {', '.join(valid)})")


def signature_keys(target: Callable[..., Any], skip: int = 0) -> list[str]:
    """The keyword arguments ``target`` takes, past its first ``skip`` parameters: the keys a config entry may set."""
    params = list(inspect.signature(target).parameters.values())[skip:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys that no schema or configured class knows (typos, ``+`` additions), naming the nearest key, and
    any ``_target_`` that is not a class cellcls creates (:mod:`cellcls.config.targets`). The ``model``, ``optim``
    and ``scheduler`` keys are their registries' to check."""
    check_targets(cfg)
    check_unknown("", [k for k in cfg if k != "hydra"], [*TOP_LEVEL, *GROUPS])
    for path, schema in SCHEMAS.items():
        node = OmegaConf.select(cfg, path)
        if node is not None:
            check_unknown(path, node.keys(), [f.name for f in fields(schema)])
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
            check_unknown(f"{group}.{name}", [k for k in node if k != "_target_"], signature_keys(target.__init__, skip=1 + skip))


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if str(value) not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fraction(name: str, value: Any, expected: str) -> float:
    """A number strictly between 0 and 1, or ConfigError naming ``name`` and what it means (``expected``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 < number < 1.0:
        raise ConfigError(f"{name}={value!r} is not valid; expected {expected}, a number between 0 and 1 (e.g. "
                          "0.95), or null")
    return number


def check_choices(cfg: DictConfig) -> None:
    """Refuse a setting outside the values its schema field lists (``choice(...)`` in :mod:`cellcls.config.schema`)."""
    for key, allowed in TOP_LEVEL_CHOICES.items():
        if key in cfg:
            check_choice(key, cfg[key], allowed)
    for path, schema in SCHEMAS.items():
        node = OmegaConf.select(cfg, path)
        if node is None:
            continue
        for f in fields(schema):
            if "choices" in f.metadata and f.name in node:
                check_choice(f"{path}.{f.name}", node[f.name], f.metadata["choices"])


def check_values(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first trainer, dataset or top-level setting outside its allowed range."""
    t = cfg.trainer
    check_positive_int("trainer.max_epochs", t.max_epochs)
    device = str(t.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"trainer.device={device!r} is not valid; allowed values: auto, cpu, cuda, cuda:<index>")
    check_positive_int("trainer.max_skipped_batches", t.max_skipped_batches, minimum=0)
    if t.gradient_clip is not None and not t.gradient_clip > 0:
        raise ConfigError(f"trainer.gradient_clip must be a positive number or null, got {t.gradient_clip!r}")
    check_positive_int("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    if t.get("ema_decay") is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"trainer.ema_decay must be between 0 and 1 (e.g. 0.999) or null, got {t.ema_decay!r}")
    smoothing = cfg.get("label_smoothing") or 0.0
    if not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ConfigError(f"label_smoothing must be a number in [0, 1) (e.g. 0.1), got {smoothing!r}")
    ds = cfg.dataset
    check_positive_int("dataset.batch_size", ds.batch_size)
    check_positive_int("dataset.num_workers", ds.num_workers, minimum=0)
    check_choice("dataset.channels", ds.channels, CHANNELS)
    size = list(ds.image_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"dataset.image_size must be [height, width] in pixels, got {size!r}")
    if ds.classes is not None and len(ds.classes) < 2:
        raise ConfigError(f"dataset.classes must name at least 2 classes, got {list(ds.classes)!r}")
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
