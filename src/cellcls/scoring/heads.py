"""The classification head's conventions: how many logits a model emits and how logits become probabilities and
labels. One rule for the training loop, evaluation, export and serving."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from cellcls.scoring.conformal import prediction_sets


def num_outputs(num_classes: int, single_logit: bool, multilabel: bool = False) -> int:
    """Logits the model emits: one for a binary task with a sigmoid head, else one per class (per finding, each
    with its own sigmoid, for multi-label data)."""
    if multilabel:
        return num_classes
    if single_logit and num_classes != 2:
        raise ValueError(f"model.single_logit=true needs exactly 2 classes, the dataset has {num_classes}")
    return 1 if single_logit else num_classes


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``N x C`` from either head: softmax over C logits, or [1 - p, p] for one logit."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class of each row: arg-max of the logits, or ``logit > 0`` (p > 0.5) for one logit.

    The same labels as ``probabilities(logits).argmax(1)`` (ties aside), without computing the probabilities."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def labels_of(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Labels from class probabilities (``N x C``): arg-max; for two classes with ``threshold``, class 1 when its
    probability is at least the threshold (``evaluate threshold=``)."""
    probs = np.asarray(probs)
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


@dataclass(frozen=True)
class Decision:
    """How a model's logits become probabilities and a label: ``probabilities(logits / temperature)``, then for
    two classes class 1 when its probability is at least ``threshold`` (None: the arg-max)."""

    temperature: float = 1.0
    threshold: float | None = None
    operating_point: str | None = None  # e.g. "sensitivity:0.95", what the threshold was chosen for
    fitted_on: str | None = None  # the split both were fitted on, with its size
    # conformal prediction sets (cellcls.scoring.conformal): the coverage aimed for, the score and its threshold
    set_level: float | None = None
    set_method: str | None = None
    set_threshold: float | None = None

    @classmethod
    def of(cls, stored: dict[str, Any] | None) -> Decision:
        """The rule a checkpoint or a model card stored (keys a later cellcls may add are left out)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (stored or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits`` under this rule (temperature applied)."""
        return probabilities(logits.float() / self.temperature)

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """Labels of class probabilities under this rule (the threshold for two classes)."""
        return labels_of(probs, self.threshold)

    @property
    def has_sets(self) -> bool:
        return self.set_threshold is not None and self.set_method is not None

    def sets(self, probs: np.ndarray) -> np.ndarray | None:
        """Boolean ``N x C`` prediction-set membership of class probabilities, or None without a fitted rule."""
        if not self.has_sets:
            return None
        assert self.set_threshold is not None and self.set_method is not None
        return prediction_sets(probs, self.set_threshold, self.set_method, self.labels(probs))
