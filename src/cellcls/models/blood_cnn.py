"""The blood-cell CNN of tutorial 002 (S2)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cellcls.models.base import SeedCNN, conv_relu, flat_features


def blood_cnn(
    in_channels: int,
    num_outputs: int,
    image_size: Sequence[int],
    conv_dropout: float = 0.25,
    dropout: float = 0.5,
) -> SeedCNN:
    """Conv(80) / Conv(64) / MaxPool 2 / Conv(64) / Dropout / Dense 128 / Dropout / Dense out; all convs 'valid'."""
    features = nn.Sequential(
        *conv_relu(in_channels, 80),
        *conv_relu(80, 64),
        nn.MaxPool2d(2),
        *conv_relu(64, 64),
        nn.Dropout(conv_dropout),
    )
    flat = flat_features(features, in_channels, image_size)
    classifier = nn.Sequential(
        nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, num_outputs)
    )
    return SeedCNN(features, classifier)
