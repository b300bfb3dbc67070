"""The training config: its typed schema, composition from ``configs/`` and the checks run before any work."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from cellcls.config.schema import register

register()


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m cellcls.train <overrides>`` would run with (outside Hydra's ``main``)."""
    from hydra import compose, initialize_config_dir

    from cellcls.paths import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# group choices and Hydra's own settings on a command line; every other `key=value` names a setting
_NOT_SETTINGS = ("experiment", "hparams_search", "hydra")
# maps whose entries the user names: a new entry is not a typo (its own keys are checked when the job starts)
_OPEN = ("dataset.splits", "dataset.class_aliases", "callbacks", "logger")


def check_command_line(argv: Sequence[str]) -> None:
    """Refuse a ``key=value`` whose key the composed config does not have, naming the nearest valid key, before
    Hydra starts (Hydra's own message says only that the key is not in the config; a ``+`` typo it accepts)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from cellcls.config.schema import GROUPS
    from cellcls.errors import ConfigError, nearest

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra reports it with its own message
        return
    choices, settings = [], []
    for o in parsed:
        root = o.key_or_group.split("/")[0].split(".")[0]
        if "/" in o.key_or_group or root in _NOT_SETTINGS or (o.key_or_group in GROUPS and not o.is_add()):
            if root not in ("hydra",) and "/" not in o.key_or_group:
                first = next(iter(o.sweep_string_iterator()), None) if o.is_sweep_override() else o.get_value_element_as_str()
                choices.append(f"{o.key_or_group}={first}")
        elif not o.is_delete():
            settings.append(o.key_or_group)
    if not settings:
        return
    try:
        cfg = compose_config(choices)
    except Exception:  # noqa: BLE001 - a bad group choice: Hydra reports it with its own message
        return
    valid = _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    for key in settings:
        if key in valid or any(key.startswith(p + ".") for p in _OPEN) or any(v.startswith(key + ".") for v in valid):
            continue
        raise ConfigError(f"unknown setting {key!r}{nearest(key, sorted(valid))} (python -m cellcls.train --cfg job "
                          "prints every setting)")


def _flat_keys(node: object, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            full = f"{prefix}{k}"
            keys.add(full)
            keys |= _flat_keys(v, full + ".")
    return keys
