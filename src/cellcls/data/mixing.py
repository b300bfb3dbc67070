"""MixUp and CutMix (``augment.mixup`` / ``augment.cutmix``): torchvision v2's batch transforms, applied in the
training step to whole batches on either pipeline. They turn integer labels into class-probability rows, which
:class:`cellcls.scoring.losses.ClassificationLoss` takes as soft targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from cellcls.data.transforms import Augment, parse_augment

BatchMix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mix(augment: Mapping[str, Any] | Augment | None, num_classes: int) -> BatchMix | None:
    """``(images, labels) -> (mixed images, N x C soft labels)``, or None when both are off."""
    if augment is None:
        return None
    a = augment if isinstance(augment, Augment) else parse_augment(augment)
    mixes: list[v2.Transform] = []
    if a.mixup > 0:
        mixes.append(v2.MixUp(alpha=a.mixup, num_classes=num_classes))
    if a.cutmix > 0:
        mixes.append(v2.CutMix(alpha=a.cutmix, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
