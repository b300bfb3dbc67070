"""torchvision's ResNet-18 as a modern baseline, adapted to any channel count."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from cellcls.models.weights import load_weights


def resnet18(
    in_channels: int, num_outputs: int, image_size: Sequence[int], weights: str | None = None
) -> nn.Module:
    """ResNet-18, randomly initialised unless ``weights`` names a local weights file (nothing is downloaded;
    ``model=timm model.arch=resnet18 model.pretrained=true`` fetches published weights).

    The classifier head of a weights file is dropped when its shape does not match ``num_outputs``.
    """
    del image_size  # global average pooling makes ResNet size-agnostic
    model = tv_resnet18(weights=None, num_classes=num_outputs)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if weights:
        load_weights(model, weights, first_conv="conv1", classifier="fc")
    return model
