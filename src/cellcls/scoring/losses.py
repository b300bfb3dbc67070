"""The training loss: cross-entropy with Keras-style class weights, and the val/test loss Keras reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from cellcls.scoring.heads import predicted_labels


def l2_penalty(model: nn.Module) -> torch.Tensor | float:
    """Keras-style kernel L2 terms the model declares (``coef * sum(w**2)``)."""
    terms = getattr(model, "l2_terms", None)
    return sum((coef * p.pow(2).sum() for p, coef in terms()), 0.0) if terms else 0.0


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """sklearn's 'balanced' weights, ``n_samples / (n_classes * count)``, as Keras' ``class_weight`` takes them."""
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def is_soft(targets: torch.Tensor) -> bool:
    """Whether ``targets`` are class-probability rows (``N x C``, from MixUp/CutMix) rather than class indices."""
    return targets.is_floating_point() and targets.ndim == 2


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices of either kind of target (the largest share of a mixed row)."""
    return targets.argmax(dim=1) if is_soft(targets) else targets


class ClassificationLoss(nn.Module):
    """Cross-entropy for ``C`` logits, binary cross-entropy for one logit; targets are class indices or, from
    MixUp/CutMix, class-probability rows. ``label_smoothing`` moves that share of each target to a uniform
    distribution over the classes (torch's ``label_smoothing``; for one logit the target becomes t(1 - e) + e/2).

    With class weights each sample's loss is scaled by its class' weight (a mixed row: the mix of its classes'
    weights) and the batch mean is taken over samples (Keras' ``class_weight`` semantics), not divided by the sum of
    weights as torch's ``weight=`` does.
    """

    def __init__(self, num_outputs: int, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_outputs = num_outputs
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        eps, soft = self.label_smoothing, is_soft(targets)
        if self.num_outputs == 1:
            t = targets[:, 1].float() if soft else targets.float()
            t = t * (1 - eps) + eps / 2 if eps else t
            per_sample = F.binary_cross_entropy_with_logits(logits.squeeze(1), t, reduction="none")
        elif soft:
            t = targets.float() * (1 - eps) + eps / logits.shape[1] if eps else targets.float()
            per_sample = F.cross_entropy(logits, t, reduction="none")
        else:
            per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=eps)
        if self.class_weights is not None:
            weights = targets.float() @ self.class_weights if soft else self.class_weights[targets]
            per_sample = per_sample * weights
        return per_sample.mean()

    @staticmethod
    def hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images predicted as their class (a mixed image: its larger share's class)."""
        return (predicted_labels(logits) == hard_labels(targets)).sum()



def positive_weights(targets: torch.Tensor) -> torch.Tensor:
    """Per finding, negatives / positives of the training split (uncertain entries counted in neither): BCE's
    ``pos_weight`` that makes each finding's positives weigh as much as its negatives (1 where a count is 0)."""
    pos = (targets == 1).sum(0).float()
    neg = (targets == 0).sum(0).float()
    return torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1), torch.ones_like(pos))


class MultiLabelLoss(nn.Module):
    """Binary cross-entropy of one logit per finding against 1 / 0 targets, NaN (uncertain, ``uncertain=ignore``)
    entries left out; the mean over the entries that count. ``pos_weight`` scales each finding's positive term."""

    def __init__(self, num_outputs: int, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_outputs = num_outputs
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        known = ~torch.isnan(targets)
        per_entry = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none",
                                                       pos_weight=self.pos_weight)
        return (per_entry * known).sum() / known.sum().clamp(min=1)

    @staticmethod
    def hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images whose every known finding is predicted right at p > 0.5 (exact-match accuracy)."""
        wrong = ((logits > 0).float() != targets) & ~torch.isnan(targets)
        return (~wrong.any(dim=1)).sum()
