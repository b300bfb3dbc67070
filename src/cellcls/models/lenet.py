"""LeNet of the malaria tutorial (S1)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cellcls.models.base import SeedCNN, conv_pool_blocks, flat_features


def lenet(in_channels: int, num_outputs: int, image_size: Sequence[int], dropout: float = 0.5) -> SeedCNN:
    """Conv(8, same) / Conv(16, same) / Conv(32, valid), each + ReLU + MaxPool 2; Dense 64; Dropout; Dense out.

    467,026 parameters at 128x128x3 with two outputs.
    """
    features = conv_pool_blocks(in_channels, [8, 16, 32], padding=["same", "same", "valid"])
    flat = flat_features(features, in_channels, image_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 64), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(64, num_outputs)
    )
    return SeedCNN(features, classifier)
