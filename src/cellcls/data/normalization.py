"""Per-channel input normalisation: none (the tutorials' rescale to [0, 1]), fixed numbers, ``auto``, or a named
preset (``imagenet``: the statistics ImageNet-pretrained weights were trained with, for fine-tuning them).

``auto`` (the default) takes the statistics of the model's pretrained starting weights when it has them (timm's
``pretrained_cfg``: what those weights were trained with), else, like ``data``, standardises each channel with the
training split's own mean and standard deviation. The latter is
what lets the seed CNNs learn on small data sets: from inputs in [0, 1] (mean ~0.5, every channel positive) LeNet
with Adam sits near chance for a seed-dependent number of epochs on the malaria subset (test accuracy 0.68 +- 0.10
over 5 seeds after 15 epochs), with standardised inputs it does not (0.95 +- 0.02); see docs/QUALITY.md.
The statistics are computed once, when a run starts, and written into the run's config and checkpoint as numbers,
so evaluation, export and serving use exactly the values the model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellcls.errors import ConfigError

AUTO = "auto"
DATA = "data"  # the training split's statistics, even for a model that starts from pretrained weights
# Standardising with more than this many training images changes the statistics by less than their rounding
UNCACHED_SAMPLE = 1000
DECIMALS = 4
# name -> (mean, std) per RGB channel; a grey model gets the channels' average (its stem is the RGB one summed)
PRESETS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def preset(name: str, channels: int) -> tuple[list[float], list[float]]:
    """The ``(mean, std)`` a named preset gives a model with ``channels`` input channels."""
    mean, std = PRESETS[name.lower()]
    if channels == 3:
        return list(mean), list(std)
    return [round(sum(mean) / 3, DECIMALS)] * channels, [round(sum(std) / 3, DECIMALS)] * channels


def is_preset(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in PRESETS


def is_auto(value: Any) -> bool:
    """``auto`` or ``data``: statistics still to be measured on the training split (``auto`` takes the starting
    weights' instead, when the model has pretrained ones: :func:`follow_weights`)."""
    return isinstance(value, str) and value.lower() in (AUTO, DATA)


def follow_weights(mean: Any, std: Any, weights: tuple[Sequence[float], Sequence[float]] | None,
                   channels: int) -> tuple[list[float], list[float]] | None:
    """The normalisation for ``dataset.mean``/``dataset.std`` of ``auto`` when the model starts from pretrained
    weights trained with ``weights`` (RGB mean, std): those numbers (a grey model gets the channels' average, as
    its summed stem expects). None when the setting is anything else (numbers, a preset, ``data``, null: an
    explicit choice wins) or the weights have no statistics."""
    if weights is None or not (isinstance(mean, str) and isinstance(std, str)):
        return None
    if mean.lower() != AUTO or std.lower() != AUTO:
        return None
    m, s = (list(map(float, v)) for v in weights)
    if channels == 3:
        return m, s
    return [round(sum(m) / len(m), DECIMALS)] * channels, [round(sum(s) / len(s), DECIMALS)] * channels


def check_normalization(mean: Any, std: Any, channels: int) -> None:
    """``dataset.mean``/``dataset.std``: both null, both ``auto``, both one preset's name, or one positive-std number
    per channel."""
    names = ", ".join(PRESETS)
    if mean is None and std is None:
        return
    if (is_auto(mean) and is_auto(std) and mean.lower() == std.lower()) or (is_preset(mean) and is_preset(std) and mean.lower() == std.lower()):
        return
    if isinstance(mean, str) or isinstance(std, str) or mean is None or std is None:
        raise ConfigError(f"dataset.mean and dataset.std must both be auto, both null, both one preset ({names}) or "
                          f"both lists (or both data: the training split's statistics); got mean={mean!r}, std={std!r}")
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, Sequence) or len(values) != channels:
            raise ConfigError(f"dataset.{key} must be auto, null, a preset ({names}) or {channels} number(s) "
                              f"(one per channel), got {values!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"dataset.{key} must hold numbers, got {list(values)!r}")
    if any(v <= 0 for v in std):
        raise ConfigError(f"dataset.std must be positive, got {list(std)!r}")


def channel_statistics(pixels: np.ndarray, rows: Sequence[int], chunk: int = 256) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of each channel, on the [0, 1] scale, over the uint8 ``N x C x H x W`` rows
    ``rows`` of ``pixels`` (typically the memory-mapped cache), read ``chunk`` rows at a time."""
    if len(rows) == 0:
        raise ConfigError("dataset.mean=auto needs at least one training image")
    channels = pixels.shape[1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    ordered = np.sort(np.asarray(rows, dtype=np.int64))
    for start in range(0, len(ordered), chunk):
        block = np.asarray(pixels[ordered[start:start + chunk]], dtype=np.float64)
        total += block.sum(axis=(0, 2, 3))
        squares += np.square(block).sum(axis=(0, 2, 3))
        count += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    # a constant channel (a blank synthetic set) would divide by zero: leave it unscaled
    std = np.where(std < 1e-3 * 255, 255.0, std)
    return [round(float(m) / 255, DECIMALS) for m in mean], [round(float(s) / 255, DECIMALS) for s in std]


def sample_rows(n: int, limit: int = UNCACHED_SAMPLE) -> list[int]:
    """Evenly spaced indices, at most ``limit`` of them (uncached data is decoded once more for its statistics)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, limit))}) if n else []


def describe(mean: Sequence[float], std: Sequence[float]) -> str:
    """The measured statistics, for the run's log."""
    return "mean " + ", ".join(f"{m:.3f}" for m in mean) + "; std " + ", ".join(f"{s:.3f}" for s in std)
