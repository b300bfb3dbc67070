"""The classes a config may create: the one allow-list for every ``_target_``.

A config read from a checkpoint, a run folder's ``config.yaml``, an exported model or a search's ``best.yaml`` may
come from someone else. Hydra's ``instantiate`` would import and call whatever ``_target_`` names
(``builtins.open``, ``pathlib.Path.touch``, ...), so nothing is created, nor even imported, unless its dotted name is
one of cellcls's own classes below, one registered with :func:`register_target` (Python code, which is trusted
already), or one an installed package declares under the ``cellcls.targets`` entry-point group::

    [project.entry-points."cellcls.targets"]
    my_logger = "mypkg.loggers:MyLogger"

This module imports nothing of cellcls above it: the names are strings, checked by a test against the classes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from cellcls.errors import ConfigError, nearest

ENTRY_POINT_GROUP = "cellcls.targets"

# Which section creates which: a callback named as a logger is as wrong as one that is no cellcls class at all.
BUILTIN: dict[str, tuple[str, ...]] = {
    "callbacks": (
        "cellcls.training.callbacks.ModelCheckpoint",
        "cellcls.training.callbacks.EarlyStopping",
        "cellcls.training.callbacks.AugmentedSamples",
        "cellcls.training.callbacks.TrainingCurves",
        "cellcls.training.callbacks.RunRecord",
        "cellcls.training.callbacks.FreezeBackbone",
    ),
    "logger": (
        "cellcls.infra.loggers.CSVLogger",
        "cellcls.infra.loggers.TensorBoardLogger",
        "cellcls.infra.loggers.MLflowLogger",
    ),
    "hydra.callbacks": ("cellcls.training.sweep.SweepSummary",),
}
SECTIONS = tuple(BUILTIN)
# classes that moved: a run folder's config.yaml or a checkpoint written before the move still names the old place
MOVED = {f"cellcls.training.loggers.{name}": f"cellcls.infra.loggers.{name}"
         for name in ("CSVLogger", "TensorBoardLogger", "MLflowLogger")}

_registered: dict[str, set[str]] = {section: set() for section in SECTIONS}

# Hydra creates its launcher and sweeper only from installed Hydra plugins (hydra.core.plugins refuses any other
# class), so those two sections are left to it; every other `_target_` anywhere in a config is checked here.
_HYDRA_PLUGINS = ("hydra.launcher", "hydra.sweeper")
# logging.config.dictConfig calls a handler's `class` and any `()` factory: Hydra's logging sections may name
# the standard library's logging classes and colorlog's formatter, nothing else
_LOGGING_SECTIONS = ("hydra.job_logging", "hydra.hydra_logging")
_LOGGING_MODULES = ("logging.", "colorlog.")


def register_target(target: type | str, section: str) -> str:
    """Allow ``target`` (a class, or its dotted name) to be created from the ``section`` of a config
    (``callbacks``, ``logger`` or ``hydra.callbacks``); returns the dotted name."""
    if section not in SECTIONS:
        raise ValueError(f"section {section!r} is not one that creates objects; allowed: {', '.join(SECTIONS)}")
    name = target if isinstance(target, str) else f"{target.__module__}.{target.__qualname__}"
    _registered[section].add(name)
    return name


def allowed_targets(section: str) -> list[str]:
    """The dotted names a config may create in ``section``: cellcls's, registered ones and installed plugins'
    (a plugin's classes are allowed in every section: installing a package is trusting it)."""
    names = set(BUILTIN.get(section, ())) | _registered.get(section, set())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module, _, attr = ep.value.partition(":")
        names.add(f"{module}.{attr}" if attr else module)
    return sorted(names)


def current_name(name: Any) -> Any:
    """Where a class that moved lives now (anything else is returned as it is)."""
    return MOVED.get(name, name) if isinstance(name, str) else name


def _targets(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """Every ``(path, key, value)`` under ``node`` whose key makes Hydra or ``logging`` create an object."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key in ("_target_", "()"):
                yield path, str(key), value
            elif key == "class" and any(path.startswith(s + ".") for s in _LOGGING_SECTIONS):
                yield path, "class", value
            elif here not in _HYDRA_PLUGINS:
                yield from _targets(value, here)
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def _section_of(path: str) -> str | None:
    for section in sorted(SECTIONS, key=len, reverse=True):
        if path == section or path.startswith(section + "."):
            return section
    return None


def check_targets(config: Any, source: str = "the config") -> None:
    """Refuse ``config`` (a dict or DictConfig, whole or one section) when any ``_target_`` in it is not allowed
    for its section, naming the setting and the target; nothing is imported. ``source`` names where the config came
    from in the message."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    for path, key, value in _targets(config, ""):
        setting = f"{path}.{key}" if path else key
        if any(path.startswith(s + ".") or path == s for s in _LOGGING_SECTIONS):
            if key == "class" and isinstance(value, str) and value.startswith(_LOGGING_MODULES):
                continue
            raise ConfigError(f"{source}: {setting}={value!r} would run code while logging is set up; only the "
                              "logging module's handlers and formatters are allowed there")
        section = _section_of(path)
        # a target must be the section's own entry (callbacks.<name>._target_), not nested in another's arguments
        own = section is not None and path.count(".") == section.count(".") + 1 and key == "_target_"
        allowed = allowed_targets(section) if own and section else []
        if isinstance(value, str) and current_name(value) in allowed:
            continue
        where = f"the {section} section" if own else "this place (only callbacks, logger and hydra.callbacks " \
                                                    "entries create objects)"
        hint = nearest(str(value), allowed) if allowed else ""
        listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
        raise ConfigError(f"{source}: {setting}={value!r} is not a class cellcls creates in {where}{hint}{listed}; "
                          "other code named by a file (a checkpoint, a run's config.yaml, a model card, best.yaml) is "
                          "refused for safety. Classes of your own: cellcls.register_target(cls, section) or the "
                          f"{ENTRY_POINT_GROUP!r} entry-point group")


def instantiate(node: Any, section: str, **kwargs: Any) -> Any:
    """Hydra's ``instantiate`` of one entry of ``section`` after :func:`check_targets`; ``kwargs`` are passed on."""
    from hydra.utils import instantiate as hydra_instantiate

    check_targets(_nest(section, node))
    target = node.get("_target_") if hasattr(node, "get") else None
    if target in MOVED:
        from omegaconf import OmegaConf

        node = OmegaConf.merge(node, {"_target_": MOVED[target]})
    return hydra_instantiate(node, **kwargs)


def resolve_target(name: str, section: str) -> type:
    """The class of an allowed dotted ``name`` in ``section`` (imported only once it is known to be allowed)."""
    from hydra.utils import get_class

    check_targets(_nest(section, {"_target_": name}))
    return get_class(current_name(name))


def _nest(section: str, node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"entry": node}
    for part in reversed(section.split(".")):
        out = {part: out}
    return out
