"""One pass of a model over a loader, and the scores the training loop and ``evaluate`` both report from it."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader

from cellcls.scoring.metrics import roc_auc
from cellcls.scoring.heads import predicted_labels, probabilities
from cellcls.scoring.losses import ClassificationLoss, MultiLabelLoss, l2_penalty
from cellcls.scoring.multilabel import epoch_scores, finding_probabilities


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and targets for every batch of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        with autocast:
            out = model(images.to(device, non_blocking=True, memory_format=memory_format))
        logits.append(out.float().cpu())
        targets.append(labels.cpu())
    return torch.cat(logits), torch.cat(targets)


def is_multilabel_target(targets: torch.Tensor) -> bool:
    """Whether evaluation targets are finding vectors (``N x K`` floats); evaluation targets are never mixed."""
    return targets.is_floating_point() and targets.ndim == 2


def mean_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Unweighted loss over all cases plus the model's L2 terms: the val/test loss Keras reports."""
    loss_fn = MultiLabelLoss if is_multilabel_target(targets) else ClassificationLoss
    loss = loss_fn(logits.shape[1])(logits, targets)
    with torch.no_grad():
        return float(loss) + float(l2_penalty(model))


@dataclass
class Scores:
    loss: float
    accuracy: float
    balanced_accuracy: float
    roc_auc: float


def score(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> Scores:
    """Loss (unweighted, with the model's L2 terms), accuracy, balanced accuracy and ROC-AUC of one pass; all NaN
    when the logits are not finite (a diverged model: there is nothing to score)."""
    if not bool(torch.isfinite(logits).all()):
        return Scores(math.nan, math.nan, math.nan, math.nan)
    if is_multilabel_target(targets):  # exact-match accuracy, balanced accuracy and ROC-AUC averaged over findings
        return Scores(mean_loss(model, logits, targets),
                      *epoch_scores(targets.numpy(), finding_probabilities(logits).numpy()))
    y_pred, y_true = predicted_labels(logits).numpy(), targets.numpy()
    return Scores(mean_loss(model, logits, targets), float((y_pred == y_true).mean()),
                  float(balanced_accuracy_score(y_true, y_pred)), roc_auc(y_true, probabilities(logits).numpy()))
