"""The X-ray CNN of the pneumonia tutorial (S4)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cellcls.models.base import SeedCNN, conv_pool_blocks, flat_features


def xray_cnn(in_channels: int, num_outputs: int, image_size: Sequence[int]) -> SeedCNN:
    """Five [Conv(f, valid) + ReLU + MaxPool 2] blocks, f = 32, 32, 32, 64, 64; Dense 128; Dense 64; Dense out.

    1,467,137 parameters at 500x500x1 with one (sigmoid) output.
    """
    features = conv_pool_blocks(in_channels, [32, 32, 32, 64, 64])
    flat = flat_features(features, in_channels, image_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Linear(64, num_outputs)
    )
    return SeedCNN(features, classifier)
