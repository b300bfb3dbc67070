"""Optimisers and LR schedulers from the ``optim`` and ``scheduler`` config groups."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, ReduceLROnPlateau

from cellcls.errors import ConfigError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
# each scheduler option and its settings (configs/scheduler/<name>.yaml holds their values)
SCHEDULERS = {"plateau": ("factor", "patience", "min_lr", "threshold", "cooldown"), "cosine": ("min_lr",), "none": ()}


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser ``cfg['name']`` with the other keys as its arguments (lr, weight_decay, betas, ...)."""
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not supported; choose one of {sorted(OPTIMIZERS)}")
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return OPTIMIZERS[name](params, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optim ({name}): {exc}") from exc


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_epochs: int, mode: str
) -> LRScheduler | ReduceLROnPlateau | None:
    """ReduceLROnPlateau on the monitored metric, cosine annealing over the run, or none.

    The plateau settings keep Keras' meaning: the LR drops once ``patience`` epochs in a row have not
    improved by more than ``threshold`` (absolute). torch counts one more bad epoch than Keras before it
    acts (``num_bad_epochs > patience`` against Keras' ``wait >= patience``), hence ``patience - 1``.
    """
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
        return CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=float(cfg["min_lr"]))
    raise ConfigError(f"scheduler.name={name!r} is not supported; choose one of {list(SCHEDULERS)}")
