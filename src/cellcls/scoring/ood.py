"""Out-of-distribution flags: is an image like the ones the model was trained on?

The score is the cosine distance of the image's features to its nearest training image (deep nearest neighbours,
Sun et al. 2022), the features being what the network's classifier head receives (the flattened convolutional features
of the seed CNNs, the pooled features of a timm backbone), normalised to unit length. The training split's features
are stored with the model (at most ``MAX_STORED``, a seeded sample). The threshold is the ``level`` quantile of the
validation split's scores: about ``1 - level`` of in-distribution images are flagged by construction, and an image
further out than that is "outside what this model was trained on".

Why features and not the softmax: a malaria LeNet calls chest X-rays "Uninfected" at 95-99%, so confidence cannot
tell them apart. Why nearest neighbours and not a Mahalanobis distance (Lee et al. 2018): measured on the shared
subsets (docs/QUALITY.md, "Per-image trust"), one Gaussian per class with a shared covariance flagged 13-36% of
X-rays and skin lesions shown to a malaria LeNet, the nearest neighbour 95-100%, at the same rate on its own test
cells. k = 1 scored best of 1, 5, 10, 20, 50 there. A short implementation rather than pytorch-ood: the fit stores
features, the score is one matrix product, and it has to travel inside a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cellcls.errors import ConfigError

MAX_STORED = 4096  # training images whose features a model keeps (Sun et al.: a 1% sample of ImageNet works)
K = 1


def head(net: nn.Module) -> nn.Module:
    """The network's classifier head: the seed CNNs' ``classifier``, a timm model's ``get_classifier()``, a
    ResNet's ``fc``, else its last linear layer. Its input is the feature vector the flags are computed on."""
    found = getattr(net, "classifier", None)
    if isinstance(found, nn.Module):
        return found
    if callable(getattr(net, "get_classifier", None)) and isinstance(net.get_classifier(), nn.Module):
        return net.get_classifier()
    if isinstance(getattr(net, "fc", None), nn.Module):
        return net.fc
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ConfigError(f"{type(net).__name__} has no classifier layer to read features before; "
                          "out-of-distribution flags need one")
    return last


@torch.inference_mode()
def head_features(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features the classifier head receives, logits) of a batch already prepared for ``net``."""
    captured: list[torch.Tensor] = []
    handle = head(net).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    try:
        logits = net(images)
    finally:
        handle.remove()
    return captured[-1].flatten(1).float().cpu(), logits.float().cpu()


def collect_features(net: nn.Module, loader: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Head features ``N x D`` and labels of every batch of ``loader``."""
    net.eval()
    feats, labels = [], []
    for images, targets in loader:
        if targets.numel() == 0:
            continue
        f, _ = head_features(net, images.to(device))
        feats.append(f.numpy())
        labels.append(targets.cpu().numpy())
    return np.concatenate(feats), np.concatenate(labels)


def check_ood_level(level: object, setting: str = "ood") -> float:
    """The share of validation images the threshold keeps inside, strictly between 0 and 1."""
    try:
        value = float(level)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{setting}={level!r} is not valid; expected the share of validation images to count as "
                          "in-distribution, a number between 0 and 1 (e.g. 0.95), or null")
    return value


def _unit(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class OODRule:
    """Unit-length training features, how many neighbours count, and the validation threshold."""

    bank: torch.Tensor  # M x D
    k: int
    threshold: float
    level: float
    fitted_on: str

    def score(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cosine distance of each row to its k-th nearest training image (higher: further out)."""
        similarity = _unit(features) @ self.bank.float().T
        return (1.0 - similarity.topk(min(self.k, len(self.bank)), dim=1).values[:, -1]).numpy()

    def flags(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """True for each image outside what the model was trained on."""
        return self.score(features) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"method": "knn", "bank": self.bank.to(torch.float16), "k": self.k, "threshold": self.threshold,
                "level": self.level, "fitted_on": self.fitted_on}

    @classmethod
    def of(cls, stored: dict[str, Any] | None) -> OODRule | None:
        if not stored:
            return None
        return cls(torch.as_tensor(stored["bank"]).float(), int(stored["k"]), float(stored["threshold"]),
                   float(stored["level"]), str(stored["fitted_on"]))


def fit_ood(train_features: np.ndarray, val_features: np.ndarray, level: float, fitted_on: str, k: int = K,
            seed: int = 0) -> OODRule:
    """Keep (a seeded sample of) the training features; the threshold at the ``level`` quantile of the validation
    features' scores."""
    level = check_ood_level(level)
    if len(train_features) > MAX_STORED:
        keep = np.random.default_rng(seed).choice(len(train_features), MAX_STORED, replace=False)
        train_features = train_features[np.sort(keep)]
    # stored in float16; scored from the same rounded values the loaded model will use
    rule = OODRule(_unit(train_features).to(torch.float16).float(), k, math.inf, level, fitted_on)
    rule.threshold = float(np.quantile(rule.score(val_features), level, method="higher"))
    return rule
