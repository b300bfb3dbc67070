"""Shared pieces of the seed architectures: conv blocks and a features/classifier network."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn


def conv_relu(in_ch: int, out_ch: int, padding: str = "valid") -> list[nn.Module]:
    """A 3x3 convolution followed by ReLU; ``padding`` is Keras' 'valid' or 'same'."""
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=padding), nn.ReLU(inplace=True)]


def conv_pool_blocks(in_ch: int, filters: Sequence[int], padding: str | Sequence[str] = "valid") -> nn.Sequential:
    """[Conv 3x3 + ReLU, MaxPool 2] for each filter count, as the seed tutorials stack them."""
    paddings = [padding] * len(filters) if isinstance(padding, str) else list(padding)
    layers: list[nn.Module] = []
    for out_ch, pad in zip(filters, paddings, strict=True):
        layers += conv_relu(in_ch, out_ch, pad)
        layers.append(nn.MaxPool2d(2))
        in_ch = out_ch
    return nn.Sequential(*layers)


def keras_init_(module: nn.Module) -> nn.Module:
    """Keras' default initialisation: Glorot-uniform kernels and zero biases for every conv and dense layer.

    The seed tutorials were trained from this start (``model.init=keras``). It is not the default: on the malaria
    subset LeNet with Adam leaves its near-chance plateau later from it than from PyTorch's own initialisation
    (docs/QUALITY.md).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def he_init_(module: nn.Module) -> nn.Module:
    """He (Kaiming) initialisation for ReLU networks: normal kernels with variance 2 / fan_in and zero biases, so
    every layer's activations keep their scale at the start (PyTorch's default, Kaiming-uniform with a = sqrt(5),
    gives each layer a third of that variance: after five ReLU layers the output barely depends on the input)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def flat_features(features: nn.Module, in_channels: int, image_size: Sequence[int]) -> int:
    """Number of features after ``features`` for one image, found by a forward pass (never hard-coded)."""
    height, width = image_size
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, height, width))
    except RuntimeError as exc:  # a kernel larger than what is left of the feature map
        raise ValueError(f"model input size {height}x{width} is too small for this architecture: {exc}") from exc
    if out.numel() == 0:
        raise ValueError(
            f"model input size {height}x{width} is too small for this architecture: "
            f"the convolution stack leaves an empty feature map {tuple(out.shape[1:])}"
        )
    return out[0].numel()


class SeedCNN(nn.Module):
    """A ``features`` stack, a flatten, and a ``classifier`` head: the shape of every seed model.

    ``l2`` maps parameter names (relative to this module) to Keras-style L2 coefficients: the loss gains
    ``coef * sum(w ** 2)`` for each, exactly as a Keras ``kernel_regularizer=l2(coef)``.
    """

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential, l2: dict[str, float] | None = None):
        super().__init__()
        self.features = features
        self.flatten = nn.Flatten()
        self.classifier = classifier
        self.l2 = {name: float(coef) for name, coef in (l2 or {}).items() if coef}
        known = dict(self.named_parameters())
        for name in self.l2:
            if name not in known:
                raise ValueError(f"L2 penalty names unknown parameter {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))

    def l2_terms(self) -> Iterator[tuple[torch.Tensor, float]]:
        """(parameter, coefficient) pairs whose squared sum the loss adds."""
        params = dict(self.named_parameters())
        for name, coef in self.l2.items():
            yield params[name], coef
