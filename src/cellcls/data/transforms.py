"""Augmentation and preprocessing with torchvision transforms v2, mapped from Keras' ImageDataGenerator.

Keras' shear_range is in radians and is converted to degrees here; zoom_range z becomes a scale in
[1 - z, 1 + z] (isotropic, where Keras zooms each axis independently); the border is filled with a
constant (``fill``) because v2's affine has no 'nearest' edge mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from cellcls.errors import ConfigError

AUGMENT_KEYS = ("rotation", "shift", "shear", "zoom", "hflip", "vflip", "fill")


def build_augment(cfg: Mapping[str, Any]) -> list[v2.Transform]:
    """The random transforms an ``augment`` config asks for, acting on uint8 image tensors."""
    unknown = set(cfg) - set(AUGMENT_KEYS) - {"name"}
    if unknown:
        raise ConfigError(f"augment: unknown setting(s) {sorted(unknown)}; allowed: {list(AUGMENT_KEYS)}")
    rotation = float(cfg.get("rotation", 0) or 0)
    shift = float(cfg.get("shift", 0) or 0)
    shear = float(cfg.get("shear", 0) or 0)
    zoom = float(cfg.get("zoom", 0) or 0)
    limits = {"rotation": (rotation, 180.0), "shift": (shift, 1.0), "shear": (shear, math.pi / 2), "zoom": (zoom, 0.99)}
    for key, (value, hi) in limits.items():
        if not 0 <= value <= hi:
            raise ConfigError(f"augment.{key} must be between 0 and {hi:g}, got {value:g}")
    transforms: list[v2.Transform] = []
    if rotation or shift or shear or zoom:
        fill = cfg.get("fill", 0)
        transforms.append(
            v2.RandomAffine(
                degrees=rotation,
                translate=(shift, shift) if shift else None,
                scale=(1 - zoom, 1 + zoom) if zoom else None,
                shear=math.degrees(shear) if shear else None,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=fill if isinstance(fill, (int, float)) else list(fill),
            )
        )
    if cfg.get("hflip"):
        transforms.append(v2.RandomHorizontalFlip(0.5))
    if cfg.get("vflip"):
        transforms.append(v2.RandomVerticalFlip(0.5))
    return transforms


def build_transform(
    augment: Mapping[str, Any] | None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image -> float model input: optional augmentation, rescale to [0, 1], optional normalisation."""
    steps: list[v2.Transform] = build_augment(augment) if augment else []
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)
