"""Optimisers and LR schedulers from the ``optim`` and ``scheduler`` config groups."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau

from cellcls.config.checks import check_choice, check_unknown, signature_keys
from cellcls.config.schema import ParamGroupsConfig
from cellcls.errors import ConfigError
from cellcls.models import split_backbone

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
# each scheduler option and its settings (configs/scheduler/<name>.yaml holds their values)
SCHEDULERS = {"plateau": ("factor", "patience", "min_lr", "threshold", "cooldown", "warmup_epochs"),
              "cosine": ("min_lr", "warmup_epochs"), "none": ()}
# cellcls' own `optim` settings, beside the optimiser's arguments: how the parameters are grouped
PARAM_GROUP_KEYS = tuple(f.name for f in fields(ParamGroupsConfig))



def check_optim_config(optim: Mapping[str, Any]) -> None:
    """Refuse an unknown optimiser, a key neither cellcls nor the torch optimiser takes, or a learning rate that
    cannot train."""
    name = str(optim.get("name"))
    check_choice("optim.name", name, sorted(OPTIMIZERS))
    check_unknown("optim", list(optim.keys()), ["name", *PARAM_GROUP_KEYS, *signature_keys(OPTIMIZERS[name], skip=1)])
    lr = optim.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optim.lr must be a positive number (e.g. 1e-3), got {lr!r}: at 0 nothing learns")


def check_scheduler_config(scheduler: Mapping[str, Any]) -> None:
    """Refuse an unknown scheduler or a setting it does not have."""
    name = str(scheduler.get("name"))
    check_choice("scheduler.name", name, list(SCHEDULERS))
    check_unknown("scheduler", list(scheduler.keys()), ["name", *SCHEDULERS[name]])


def param_groups(net: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float,
                 decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the head first at ``lr`` (the logged LR), the backbone at
    ``lr * backbone_lr_scale``; without ``decay_norm_and_bias`` biases and normalisation weights (every 1-d
    parameter, timm's rule) get no weight decay."""
    if backbone_lr_scale != 1.0:
        backbone, head = split_backbone(net)
        parts = [(head, 1.0), (backbone, float(backbone_lr_scale))]
    else:
        parts = [(list(net.named_parameters()), 1.0)]
    groups = []
    for named, scale in parts:
        decayed = [p for _, p in named if decay_norm_and_bias or p.ndim > 1]
        plain = [p for _, p in named if not decay_norm_and_bias and p.ndim <= 1]
        groups += [{"params": ps, "lr": lr * scale, "weight_decay": wd}
                   for ps, wd in ((decayed, weight_decay), (plain, 0.0)) if ps]
    return groups


def build_optimizer(net: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser ``cfg['name']`` over ``net``'s parameter groups, with the other keys as its arguments (lr,
    weight_decay, betas, ...)."""
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not supported; choose one of {sorted(OPTIMIZERS)}")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    grouping = ParamGroupsConfig(**{k: kwargs.pop(k) for k in PARAM_GROUP_KEYS if k in kwargs})
    if not float(grouping.backbone_lr_scale) >= 0:
        raise ConfigError(f"optim.backbone_lr_scale must be a number >= 0 (e.g. 0.1), got {grouping.backbone_lr_scale!r}")
    groups = param_groups(net, float(kwargs["lr"]), float(kwargs.get("weight_decay") or 0.0),
                          float(grouping.backbone_lr_scale), bool(grouping.decay_norm_and_bias))
    try:
        return OPTIMIZERS[name](groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optim ({name}): {exc}") from exc


class Warmup:
    """``scheduler.warmup_epochs``: the LR climbs linearly, ``lr * e / (W + 1)`` in epoch e <= W, then the wrapped
    schedule takes over from the full LR (a cosine schedule then spans the remaining epochs)."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, after: LRScheduler | ReduceLROnPlateau | None):
        self.optimizer, self.epochs, self.after = optimizer, int(epochs), after
        self.base = [float(g["lr"]) for g in optimizer.param_groups]
        self.done = 0  # epochs stepped
        self._set(1 / (self.epochs + 1))

    def _set(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * factor

    def step(self, metric: float | None = None, patience: bool = True) -> None:
        self.done += 1
        if self.done < self.epochs:
            self._set((self.done + 1) / (self.epochs + 1))
        elif self.done == self.epochs:
            self._set(1.0)
        elif self.after is not None:
            step_scheduler(self.after, metric, patience)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "base": self.base,
                "after": self.after.state_dict() if self.after is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.base = int(state["done"]), list(state["base"])
        if self.after is not None and state.get("after") is not None:
            self.after.load_state_dict(state["after"])


Scheduler = LRScheduler | ReduceLROnPlateau | Warmup


def step_scheduler(scheduler: Scheduler | None, metric: float | None, patience: bool = True) -> None:
    """One epoch's step: ReduceLROnPlateau (and a warm-up wrapping it) reads the monitored metric; with
    ``patience=False`` (no epoch has beaten chance yet: :class:`cellcls.training.state.Monitor`) the plateau
    scheduler is not stepped, so it counts no bad epochs, while time-based schedules step as usual."""
    if isinstance(scheduler, Warmup):
        scheduler.step(metric, patience)
    elif isinstance(scheduler, ReduceLROnPlateau):
        if patience:
            scheduler.step(metric)
    elif scheduler is not None:
        scheduler.step()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_epochs: int, mode: str
) -> Scheduler | None:
    """ReduceLROnPlateau on the monitored metric, cosine annealing over the run, or none; after
    ``warmup_epochs`` of linear warm-up when it is set (:class:`Warmup`).

    The plateau settings keep Keras' meaning: the LR drops once ``patience`` epochs in a row have not
    improved by more than ``threshold`` (absolute). torch counts one more bad epoch than Keras before it
    acts (``num_bad_epochs > patience`` against Keras' ``wait >= patience``), hence ``patience - 1``.
    """
    warmup = int(cfg.get("warmup_epochs") or 0)
    if warmup < 0 or (warmup and warmup >= max_epochs):
        raise ConfigError(f"scheduler.warmup_epochs must be >= 0 and below trainer.max_epochs ({max_epochs}), "
                          f"got {warmup}")
    after = _schedule(optimizer, cfg, max_epochs - warmup, mode)
    return Warmup(optimizer, warmup, after) if warmup else after


def _schedule(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], epochs: int, mode: str
              ) -> LRScheduler | ReduceLROnPlateau | None:
    name = cfg["name"]
    if name == "none":
        return None
    if name == "plateau":
        return ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=float(cfg["factor"]),
            patience=max(int(cfg["patience"]) - 1, 0),
            threshold=float(cfg["threshold"]),
            threshold_mode="abs",
            min_lr=float(cfg["min_lr"]),
            cooldown=int(cfg["cooldown"]),
        )
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=epochs, eta_min=float(cfg["min_lr"]))
    raise ConfigError(f"scheduler.name={name!r} is not supported; choose one of {list(SCHEDULERS)}")
