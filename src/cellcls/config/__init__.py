"""The training config: its typed schema, composition from ``configs/`` and the checks run before any work."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from cellcls.config.schema import register
from cellcls.config.targets import check_targets

register()


def compose_config(overrides: Sequence[str] = (), hydra: bool = False) -> DictConfig:
    """The config ``python -m cellcls.train <overrides>`` would run with (outside Hydra's ``main``); ``hydra=True``
    keeps Hydra's own section (callbacks, launcher, logging)."""
    from hydra import compose, initialize_config_dir

    from cellcls.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


# group choices and Hydra's own settings on a command line; every other `key=value` names a setting
_NOT_SETTINGS = ("experiment", "hydra")
# maps whose entries the user names: a new entry is not a typo (its own keys are checked when the job starts)
_OPEN = ("dataset.splits", "dataset.class_aliases", "callbacks", "logger")


def check_command_line(argv: Sequence[str]) -> None:
    """Check a ``python -m cellcls.train`` command line before Hydra starts, as a ``ConfigError``: a key the composed
    config does not have (``+`` or not), naming the nearest valid key, and a value Hydra cannot compose (a wrong type,
    an unknown option). Sweeps are checked with the first value of each. Hydra's own messages would exit 1 without
    the nearest key, and a ``+`` typo would pass silently."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from cellcls.config.schema import GROUPS
    from cellcls.errors import ConfigError, nearest

    if any(a.split("=")[0] in _OWN_CONFIG_FLAGS for a in argv):
        _check_extra_folder(argv)
        return  # the user's own config folder: Hydra composes it, with its own messages
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra reports it with its own message
        return
    choices, settings, single = [], [], []
    for o in parsed:
        root = o.key_or_group.split("/")[0].split(".")[0]
        if root == "hydra" or "/" in o.key_or_group:
            continue
        line = o.input_line
        if o.is_sweep_override():
            line = f"{line.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}"
        single.append(line)
        if root in _NOT_SETTINGS or (o.key_or_group in GROUPS and not o.is_add()):
            choices.append(line)
        elif not o.is_delete():
            settings.append(o.key_or_group)
    try:
        cfg = compose_config(choices)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors have several types
        raise ConfigError(_hydra_message(exc)) from None
    valid = _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    for key in settings:
        if key in valid or any(key.startswith(p + ".") for p in _OPEN) or any(v.startswith(key + ".") for v in valid):
            continue
        raise ConfigError(f"unknown setting {key!r}{nearest(key, sorted(valid))} (python -m cellcls.train --cfg job "
                          "prints every setting)")
    try:
        composed = compose_config(single, hydra=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(_hydra_message(exc)) from None
    check_targets(composed, source="the command line's config")  # before Hydra creates its callbacks


def _check_extra_folder(argv: Sequence[str]) -> None:
    """With ``--config-dir <folder>`` (a search's ``experiment=best``), the classes its files name to create are
    checked before Hydra creates any (its ``hydra.callbacks`` run before cellcls sees the config). Another primary
    config (``--config-name``/``--config-path``) is the user's own program and is not checked."""
    from pathlib import Path

    folder, rest = None, []
    args = iter(argv)
    for a in args:
        flag, eq, value = a.partition("=")
        if flag in ("--config-name", "-cn", "--config-path", "-cp"):
            return
        if flag in ("--config-dir", "-cd"):
            folder = value if eq else next(args, None)
        elif "=" in a and not a.startswith("-"):
            rest.append(a)
    if folder is None:
        return
    try:
        composed = compose_config([*rest, f"hydra.searchpath=[file://{Path(folder).resolve()}]"], hydra=True)
    except Exception:  # noqa: BLE001 - a composition error: Hydra reports it with its own message
        return
    check_targets(composed, source=f"the config in {folder}")


_OWN_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _hydra_message(exc: BaseException) -> str:
    """Hydra's composition error and its cause, on one line, without its notes on search paths and stack traces."""
    lines = []
    for part in (exc, exc.__cause__):
        for ln in str(part or "").splitlines():
            if "Config search path" in ln:
                break
            if ln.strip() and "HYDRA_FULL_ERROR" not in ln and "object_type=" not in ln and "full_key" not in ln:
                lines.append(ln.strip())
    return "; ".join(dict.fromkeys(lines))


def _flat_keys(node: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            full = f"{prefix}{k}"
            keys.add(full)
            keys |= _flat_keys(v, full + ".")
    return keys
