"""The training loss: cross-entropy with Keras-style class weights, and the val/test loss Keras reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' weights, ``n_samples / (n_classes * count)``, as Keras' ``class_weight`` takes them."""
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Cross-entropy for ``C`` logits, binary cross-entropy for one logit.

    With class weights each sample's loss is scaled by its class' weight and the batch mean is taken over
    samples (Keras' ``class_weight`` semantics), not divided by the sum of weights as torch's ``weight=`` does.
    """

    def __init__(self, num_outputs: int, class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_outputs = num_outputs
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.num_outputs == 1:
            per_sample = F.binary_cross_entropy_with_logits(logits.squeeze(1), targets.float(), reduction="none")
        else:
            per_sample = F.cross_entropy(logits, targets, reduction="none")
        if self.class_weights is not None:
            per_sample = per_sample * self.class_weights[targets]
        return per_sample.mean()

