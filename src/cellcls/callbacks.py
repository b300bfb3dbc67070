"""Early stopping on any logged metric, as Keras' EarlyStopping does it."""

from __future__ import annotations

import math
from typing import Any


def metric_mode(metric: str, mode: str = "auto") -> str:
    """'min' for losses, 'max' for everything else, unless ``mode`` says otherwise."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric else "max"


class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    Also tracks the best value and epoch, which decide when ``best.pt`` is written.
    """

    def __init__(self, monitor: str, mode: str = "auto", patience: int = 3, min_delta: float = 0.0, enabled: bool = True):
        self.monitor = monitor
        self.mode = metric_mode(monitor, mode)
        self.patience = int(patience)
        self.min_delta = abs(float(min_delta))
        self.enabled = enabled
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0
        self.wait = 0

    def improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float, epoch: int) -> tuple[bool, bool]:
        """Record ``value`` for ``epoch``; returns (improved, should_stop)."""
        if math.isnan(value):
            raise FloatingPointError(f"monitored metric {self.monitor} is NaN at epoch {epoch}: training diverged")
        better = self.improved(value)
        if better:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return better, self.enabled and self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = float(state["best"]), int(state["best_epoch"]), int(state["wait"])
