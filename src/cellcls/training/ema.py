"""An exponential moving average of the weights (``trainer.ema_decay``): the model that is validated,
checkpointed and exported when it is on.

Plain PyTorch rather than ``torch.optim.swa_utils.AveragedModel`` for its warm-up: a fixed decay of 0.999 would
still hold a third of the random initialisation after 1,000 steps, which is a whole run on the small data sets;
the decay used is ``min(decay, (1 + n) / (10 + n))`` after n updates, as timm's ModelEma does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of ``net`` pulled towards it after every optimiser step; buffers (BatchNorm statistics) are
    copied as they are."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"trainer.ema_decay must be between 0 and 1 (e.g. 0.999), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(net).eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average towards ``net``'s current weights."""
        decay = self.current_decay()
        self.updates += 1
        ema_params = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        params = [p.detach() for p in net.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), net.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
