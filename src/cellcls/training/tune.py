"""Hyper-parameter search with Optuna (``python -m cellcls.tune``): one study per search file, its trials ordinary runs.

A search file (``configs/hparams_search/<name>.yaml``, schema :class:`SearchSpec`) declares the study, the sampler,
the pruner and the search space. Each trial composes the training config exactly as ``python -m cellcls.train``
would with the sampled overrides, trains it into ``<output>/trials/<number>/`` and returns the monitored metric (or
the cross-validated one with ``cv.folds``); the pruner sees that metric after every epoch and may stop the run early
(the trial is then ``PRUNED`` and its ``result.json`` says so). The study lives in ``<output>`` (SQLite unless a
database URL or a journal file is given), so the same command resumes it and several processes share it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from cellcls.errors import ConfigError, nearest
from cellcls.training.callbacks import Callback

log = logging.getLogger("cellcls.tune")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "threshold", "none")


@dataclass
class ParamSpec:
    """One dimension of the search: ``choices`` (categorical), or ``low``/``high`` (int when both are whole numbers,
    float otherwise; ``log`` scale, ``step``); ``when: {param: value}`` samples it only under that choice."""

    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: Any = None
    when: Any = None


@dataclass
class SearchSpec:
    """A search file: what a study searches and how."""

    study: str = "cellcls"  # the study's name (and its folder under outputs/tune/)
    trials: int = 20  # trials the study should hold in all (finished, pruned or failed); a re-run adds the rest
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe", "seed": 0})  # tpe | random, seed
    # median (n_startup_trials, n_warmup_steps) | hyperband (min_resource, reduction_factor) | threshold (lower,
    # upper, n_warmup_steps: stop a trial whose metric leaves [lower, upper]) | none
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    overrides: list[str] = field(default_factory=list)  # training overrides every trial shares
    params: dict[str, ParamSpec] = field(default_factory=dict)


def _check_keys(where: str, given: Sequence[str], valid: Sequence[str]) -> None:
    for key in given:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{nearest(key, list(valid))} (valid: {', '.join(valid)})")


def load_search(source: str | Path) -> SearchSpec:
    """A search file by name (``configs/hparams_search/<name>.yaml``) or path, checked key by key."""
    from cellcls.paths import config_dir

    path = Path(source)
    if not path.is_file():
        path = config_dir() / "hparams_search" / f"{source}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (config_dir() / "hparams_search").glob("*.yaml"))
        raise ConfigError(f"search={source}: no such file, nor a search in configs/hparams_search/ "
                          f"({', '.join(names)}){nearest(str(source), names)}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study, trials, sampler, pruner, overrides, params")
    _check_keys(str(path), list(raw), [f.name for f in fields(SearchSpec)])
    params = {}
    for name, spec in (raw.pop("params", None) or {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: params.{name} must be a mapping (choices: [...], or low/high)")
        _check_keys(f"{path}: params.{name}", list(spec), [f.name for f in fields(ParamSpec)])
        param = ParamSpec(**spec)
        if (param.choices is None) == (param.low is None or param.high is None):
            raise ConfigError(f"{path}: params.{name} needs either choices: [...] or both low and high")
        params[name] = param
    if not params:
        raise ConfigError(f"{path}: params is empty; nothing to search")
    spec = SearchSpec(**raw, params=params)
    for name, param in params.items():
        for other in (param.when or {}):
            if other not in params or list(params).index(other) > list(params).index(name):
                raise ConfigError(f"{path}: params.{name}.when names {other!r}, which must be a parameter listed "
                                  "before it")
    _choice("sampler.name", spec.sampler.get("name", "tpe"), SAMPLERS, path)
    _choice("pruner.name", spec.pruner.get("name", "median"), PRUNERS, path)
    return spec


def _choice(key: str, value: Any, allowed: Sequence[str], path: Path) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {key}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def suggest(trial: Any, params: dict[str, ParamSpec]) -> dict[str, Any]:
    """The trial's values, in file order; a ``when`` parameter only where its condition holds."""
    chosen: dict[str, Any] = {}
    for name, p in params.items():
        if p.when and any(chosen.get(k) != v for k, v in p.when.items()):
            continue
        if p.choices is not None:
            chosen[name] = trial.suggest_categorical(name, list(p.choices))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in (p.low, p.high)):
            chosen[name] = trial.suggest_int(name, p.low, p.high, step=int(p.step or 1), log=bool(p.log))
        else:
            chosen[name] = trial.suggest_float(name, float(p.low), float(p.high), log=bool(p.log),
                                               step=None if p.step is None else float(p.step))
    return chosen


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Hydra overrides for sampled values (a config group's name, ``optim``, takes an option: ``optim=sgd``)."""
    def text(v: Any) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"{name}={text(value)}" for name, value in values.items()]


def make_sampler(settings: dict[str, Any]):
    import optuna

    args = {k: v for k, v in settings.items() if k != "name"}
    return (optuna.samplers.RandomSampler if settings.get("name") == "random" else optuna.samplers.TPESampler)(**args)


def make_pruner(settings: dict[str, Any]):
    import optuna

    args = {k: v for k, v in settings.items() if k != "name"}
    name = settings.get("name", "median")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**args)
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**args)
    return optuna.pruners.MedianPruner(**args)


def make_storage(setting: str | None, output: Path):
    """``sqlite:///<output>/study.db`` by default; a database URL; or a journal file (``*.log``, ``*.journal``:
    safe for many processes on one disk or NFS, e.g. SLURM array jobs)."""
    import optuna

    if setting and not setting.endswith((".log", ".journal")):
        url = setting
    elif setting:
        from optuna.storages.journal import JournalFileBackend

        Path(setting).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(setting).expanduser())))
    else:
        output.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(output / 'study.db').resolve()}"
    # the heartbeat marks the trials of a killed process failed, and the retry runs each of them once more
    with warnings.catch_warnings():  # Optuna marks the heartbeat experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
            heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


class TrialPruning(Callback):
    """Reports the monitored metric to the Optuna trial after each epoch and stops the run when the pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_validation_end(self, state, metrics: dict[str, float]) -> None:
        value = metrics[state.monitor.metric]
        if not math.isfinite(value):
            return
        self.trial.report(value, state.epoch)
        if self.trial.should_prune():
            self.pruned_at = state.epoch
            state.should_stop = True
            log.info("trial %d pruned after epoch %d (%s %.4f)", self.trial.number, state.epoch,
                     state.monitor.metric, value)

