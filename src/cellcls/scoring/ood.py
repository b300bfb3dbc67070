"""Out-of-distribution flags: is an image like the ones the model was trained on?

The score is a Mahalanobis distance (Lee et al. 2018) on the image's activation statistics: the mean and standard
deviation of each channel of the input and of up to ``MAX_LAYERS`` convolution layers spread over the network's depth
(each layer's channels averaged into at most ``MAX_GROUPS`` groups), and the correlation of each pair of input
channels, standardised by the training split and scored under one covariance shrunk towards the identity (Ledoit &
Wolf 2004), so a few hundred images are enough. The threshold is the ``level`` quantile of the validation split's
scores: about ``1 - level`` of in-distribution images are flagged by construction, and an image further out is
"outside what this model was trained on".

Why not the softmax: a malaria LeNet calls chest X-rays "Uninfected" at 95-99%. Why statistics of every depth and not
the features the classifier head receives: measured on the shared subsets (docs/QUALITY.md, "Per-image trust"), the
head's features, by nearest neighbour or by Mahalanobis distance, flagged 0-64% of the chest X-rays shown to the
README's malaria LeNet; these statistics flagged 100% of them, and 99.5% of skin lesions, at 2% of its own test cells.
A short implementation rather than pytorch-ood: the fit is a mean and a covariance, the score one matrix product, and
it has to travel inside a checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch import nn

from cellcls.config.checks import check_fraction

log = logging.getLogger(__name__)

METHOD = "activation-statistics mahalanobis, input channel correlations"  # a rule of another method is not scored
MAX_LAYERS = 8  # convolution layers whose statistics are used, evenly spread over the network's depth
MAX_GROUPS = 64  # a wider layer's channels are averaged in this many groups (bounds the covariance's size)
CORRELATION_FLOOR = 1e-4  # 1 - r is floored here: a greyscale image (r = 1) scores -log(1e-4) = 9.2, stably in float32


def statistic_layers(net: nn.Module) -> list[str]:
    """Names of the convolution layers the statistics come from (the last one always among them)."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Conv2d)]
    if len(names) <= MAX_LAYERS:
        return names
    picks = np.linspace(0, len(names) - 1, MAX_LAYERS).round().astype(int)
    return [names[i] for i in sorted(set(picks))]


def _channel_stats(x: torch.Tensor) -> list[torch.Tensor]:
    n, c = x.shape[:2]
    flat = x.float().reshape(n, c, -1)
    if c > MAX_GROUPS:
        flat = flat[:, : c - c % MAX_GROUPS].reshape(n, MAX_GROUPS, -1)
    return [flat.mean(dim=2), flat.std(dim=2, correction=0)]


def _channel_correlations(x: torch.Tensor) -> list[torch.Tensor]:
    """Each pair of input channels' correlation over the pixels, as ``-log(1 - r)``: a greyscale image in a colour
    model's input has r = 1 in every pair, which per-channel means and spreads cannot show (measured: the skin-lesion
    model flagged 16% of chest X-rays without it, 100% with it; docs/QUALITY.md). Elementwise operations only, so the
    exported graph computes it in float even when its convolutions are quantized."""
    n, c = x.shape[:2]
    if c < 2:
        return []
    flat = x.float().reshape(n, c, -1)
    z = (flat - flat.mean(dim=2, keepdim=True)) / (flat.std(dim=2, keepdim=True, correction=0) + 1e-6)
    r = torch.stack([(z[:, i] * z[:, j]).mean(dim=1) for i in range(c) for j in range(i + 1, c)], dim=1)
    return [-torch.log((1 - r).clamp(min=CORRELATION_FLOOR))]


def statistics_of(net: nn.Module, images: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics ``N x D``, logits) of a batch already prepared for ``net``, on its device and traceable (the
    exported graph computes them too)."""
    modules = dict(net.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: captured.__setitem__(name, torch.relu(out)))
        for name in layers]
    try:
        logits = net(images)
    finally:
        for h in handles:
            h.remove()
    parts = _channel_stats(images) + _channel_correlations(images)
    for name in layers:
        parts += _channel_stats(captured[name])
    return torch.cat(parts, dim=1), logits


@torch.inference_mode()
def activation_statistics(net: nn.Module, images: torch.Tensor,
                          layers: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics ``N x D``, logits) of a batch already prepared for ``net``, on the CPU."""
    stats, logits = statistics_of(net, images, layers if layers is not None else statistic_layers(net))
    return stats.cpu(), logits.float().cpu()


def collect_statistics(net: nn.Module, loader: Any, device: torch.device) -> np.ndarray:
    """Activation statistics of every batch of ``loader``, ``N x D``."""
    net.eval()
    layers = statistic_layers(net)
    out = [activation_statistics(net, images.to(device), layers)[0].numpy()
           for images, targets in loader if targets.numel() > 0]
    return np.concatenate(out).astype(np.float64)


def check_ood_level(level: object, setting: str = "ood") -> float:
    """The share of validation images the threshold keeps inside, strictly between 0 and 1."""
    return check_fraction(setting, level, "the share of validation images to count as in-distribution")


@dataclass
class OODRule:
    """The training statistics' mean, scale and shrunk precision matrix, and the validation threshold."""

    mean: torch.Tensor  # D
    scale: torch.Tensor  # D
    precision: torch.Tensor  # D x D
    threshold: float
    level: float
    fitted_on: str

    def score(self, statistics: np.ndarray | torch.Tensor) -> np.ndarray:
        """Squared Mahalanobis distance of each row to the training statistics (higher: further out)."""
        z = (torch.as_tensor(np.asarray(statistics), dtype=torch.float64) - self.mean.double()) / self.scale.double()
        return torch.einsum("nd,de,ne->n", z, self.precision.double(), z).numpy()

    def flags(self, statistics: np.ndarray | torch.Tensor) -> np.ndarray:
        """True for each image outside what the model was trained on."""
        return self.score(statistics) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "mean": self.mean.float(), "scale": self.scale.float(),
                "precision": self.precision.float(), "threshold": self.threshold, "level": self.level,
                "fitted_on": self.fitted_on}

    @classmethod
    def of(cls, stored: dict[str, Any] | None, source: str = "the checkpoint") -> OODRule | None:
        """The stored rule; None (with a warning) for a rule of another method, which this cellcls cannot score."""
        if not stored:
            return None
        if stored.get("method") != METHOD:
            log.warning("%s holds an out-of-distribution rule of another method (%s); it is not used: refit it with "
                        "python -m cellcls.calibrate checkpoint=<run> ood=%s", source, stored.get("method"),
                        stored.get("level", 0.95))
            return None
        return cls(torch.as_tensor(stored["mean"]), torch.as_tensor(stored["scale"]),
                   torch.as_tensor(stored["precision"]), float(stored["threshold"]), float(stored["level"]),
                   str(stored["fitted_on"]))


def fit_ood(train_statistics: np.ndarray, val_statistics: np.ndarray, level: float, fitted_on: str) -> OODRule:
    """Standardise by the training statistics, shrink their covariance, threshold at the ``level`` quantile of
    the validation statistics' scores."""
    level = check_ood_level(level)
    mean, scale = train_statistics.mean(axis=0), train_statistics.std(axis=0) + 1e-6
    precision = LedoitWolf(assume_centered=True).fit((train_statistics - mean) / scale).precision_
    # stored in float32; scored from the same rounded values the loaded model will use
    rule = OODRule(*(torch.as_tensor(a, dtype=torch.float32) for a in (mean, scale, precision)), math.inf, level,
                   fitted_on)
    rule.threshold = float(np.quantile(rule.score(val_statistics), level, method="higher"))
    return rule
