"""The 4-block custom CNN of the skin-cancer tutorial (S3)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cellcls.models.base import SeedCNN, conv_pool_blocks, flat_features


def skin_cnn(
    in_channels: int,
    num_outputs: int,
    image_size: Sequence[int],
    dropout: float = 0.5,
    dense_l2: float = 0.001,
) -> SeedCNN:
    """[Conv(f, valid) + ReLU + MaxPool 2] for f = 16, 32, 64, 128; Flatten; Dropout; Dense 512 (L2 on its
    kernel, Keras ``l2(dense_l2)``); Dense out."""
    features = conv_pool_blocks(in_channels, [16, 32, 64, 128])
    flat = flat_features(features, in_channels, image_size)
    classifier = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.Linear(512, num_outputs)
    )
    return SeedCNN(features, classifier, l2={"classifier.1.weight": dense_l2})
