"""Augmentation and preprocessing with torchvision transforms v2, mapped from Keras' ImageDataGenerator.

Keras' shear_range is in radians and is converted to degrees here; zoom_range z becomes a scale in
[1 - z, 1 + z] (isotropic, where Keras zooms each axis independently); the border is filled with a
constant (``fill``) because v2's affine has no 'nearest' edge mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torchvision.transforms import v2

from cellcls.config.schema import POLICIES, AugmentConfig
from cellcls.data.preprocessing import Normalize, to_unit
from cellcls.errors import ConfigError, nearest



@dataclass
class Augment(AugmentConfig):
    """An ``augment`` config after :func:`parse_augment` has checked it: the schema's fields (held once, in
    :class:`cellcls.config.schema.AugmentConfig`) and what the per-image and batched pipelines derive from them."""

    @property
    def shear_degrees(self) -> float:
        """Keras' ``shear_range`` is in radians; torchvision's affine takes degrees."""
        return math.degrees(float(self.shear))

    @property
    def fill_values(self) -> tuple[float, ...]:
        """The border fill, 0-255: one value, or one per channel."""
        return (float(self.fill),) if isinstance(self.fill, (int, float)) else tuple(float(v) for v in self.fill)

    @property
    def affine(self) -> bool:
        return bool(self.rotation or self.shift or self.shear or self.zoom)

    @property
    def any(self) -> bool:
        """Whether any per-image transform is on (MixUp/CutMix act on whole batches, in the training step)."""
        return self.affine or self.hflip or self.vflip or self.policy != "none"

    def policy_transform(self, fill: float | list[float]) -> v2.Transform | None:
        """torchvision v2's RandAugment / TrivialAugmentWide, or None."""
        if self.policy == "randaugment":
            return v2.RandAugment(num_ops=self.policy_ops, magnitude=self.policy_magnitude, fill=fill)
        if self.policy == "trivialaugment":
            return v2.TrivialAugmentWide(fill=fill)
        return None


def parse_augment(cfg: Mapping[str, Any] | Augment) -> Augment:
    """Validate an ``augment`` config: unknown keys and out-of-range values are errors naming the setting;
    missing keys take the schema's defaults (:class:`cellcls.config.schema.AugmentConfig`). An ``Augment`` is
    returned as it is."""
    if isinstance(cfg, Augment):
        return cfg
    known = [f.name for f in fields(AugmentConfig)]
    for key in cfg:
        if key not in known:
            raise ConfigError(f"augment: unknown setting {key!r}{nearest(key, known)} (allowed: {', '.join(known)})")
    a = Augment(**cfg)
    limits = {"rotation": (a.rotation, 180.0), "shift": (a.shift, 1.0), "shear": (a.shear, math.pi / 2), "zoom": (a.zoom, 0.99)}
    for key, (value, hi) in limits.items():
        if not 0 <= float(value) <= hi:
            raise ConfigError(f"augment.{key} must be between 0 and {hi:g}, got {value:g}")
    if a.policy not in POLICIES:
        raise ConfigError(f"augment.policy={a.policy!r} is not valid; allowed values: {', '.join(POLICIES)}")
    if not 0 <= int(a.policy_magnitude) <= 30 or int(a.policy_ops) < 1:
        raise ConfigError(f"augment.policy_ops must be >= 1 and augment.policy_magnitude in 0-30, got "
                          f"{a.policy_ops} and {a.policy_magnitude}")
    for key in ("mixup", "cutmix"):
        if float(getattr(a, key)) < 0:
            raise ConfigError(f"augment.{key} is a Beta distribution's alpha (> 0 turns it on), got {getattr(a, key)}")
    try:
        a.fill_values  # noqa: B018 - read once here, so a bad fill fails now and by name
    except (TypeError, ValueError):
        raise ConfigError(f"augment.fill must be a number 0-255 or one per channel, got {a.fill!r}") from None
    return a


def build_augment(cfg: Mapping[str, Any] | Augment) -> list[v2.Transform]:
    """The random transforms an ``augment`` config asks for, acting on uint8 image tensors."""
    a = parse_augment(cfg)
    transforms: list[v2.Transform] = []
    if a.affine:
        transforms.append(
            v2.RandomAffine(
                degrees=a.rotation,
                translate=(a.shift, a.shift) if a.shift else None,
                scale=(1 - a.zoom, 1 + a.zoom) if a.zoom else None,
                shear=a.shear_degrees if a.shear else None,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=a.fill_values[0] if len(a.fill_values) == 1 else list(a.fill_values),
            )
        )
    if a.hflip:
        transforms.append(v2.RandomHorizontalFlip(0.5))
    if a.vflip:
        transforms.append(v2.RandomVerticalFlip(0.5))
    policy = a.policy_transform(a.fill_values[0] if len(a.fill_values) == 1 else list(a.fill_values))
    if policy is not None:
        transforms.append(policy)
    return transforms


def build_transform(
    augment: Mapping[str, Any] | Augment | None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image -> float model input: optional augmentation, rescale to [0, 1], optional normalisation."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = list(build_augment(augment)) if augment else []
    steps += [to_unit, Normalize(mean, std)]
    return v2.Compose(steps)
