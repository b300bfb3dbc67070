"""Test-time augmentation by flips (``tta=`` of evaluate and predict): the model's logits averaged over the image
and its flipped copies.

Logits rather than probabilities are averaged so that everything downstream stays one rule: the temperature and
threshold fitted on validation apply to the averaged logits as they did to single ones, and the val/test loss is
the loss of one set of logits (the softmax of mean logits is the normalised geometric mean of the views' probabilities).
"""

from __future__ import annotations

import torch
from torch import nn

from cellcls.errors import ConfigError

# each mode's extra views, as the dimensions of an N x C x H x W batch to flip (the image itself always counts)
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": (),
    "hflip": ((3,),),
    "vflip": ((2,),),
    "flips": ((3,), (2,), (2, 3)),  # horizontal, vertical and both (a 180 degree rotation)
}


class FlipAverage(nn.Module):
    """``net``'s logits averaged over the input and its flips."""

    def __init__(self, net: nn.Module, mode: str) -> None:
        super().__init__()
        self.net, self.views = net, TTA_VIEWS[mode]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        for dims in self.views:
            out = out + self.net(torch.flip(x, dims))
        return out / (len(self.views) + 1)


def check_tta(mode: str, setting: str = "tta") -> str:
    """``mode`` if it is a known flip set; else a ConfigError naming ``setting`` (``tta``, or the probe's ``flips``)."""
    if mode not in TTA_VIEWS:
        raise ConfigError(f"{setting}={mode!r} is not valid; allowed values: {', '.join(TTA_VIEWS)} (flips: horizontal, "
                          "vertical and both)")
    return mode


def with_tta(net: nn.Module, mode: str) -> nn.Module:
    """``net`` itself for ``none``, else its :class:`FlipAverage`."""
    return net if check_tta(mode) == "none" else FlipAverage(net, mode)
