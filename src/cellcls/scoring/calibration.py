"""Whether the probabilities mean what they say, and the decision rule stored with a model.

Measures: the expected calibration error (ECE: the gap between confidence and accuracy, averaged over confidence
bins) and the Brier score. Fixes, both fitted on the validation split and stored in the checkpoint
(:class:`cellcls.scoring.heads.Decision`): temperature scaling (Guo et al. 2017: logits / T, one number that
minimises the validation negative log-likelihood; accuracy is unchanged) and, for two classes, an operating point:
the threshold on the positive class's probability that reaches a target sensitivity or specificity on validation;
and conformal prediction sets (:mod:`cellcls.scoring.conformal`), fitted on the calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cellcls.errors import ConfigError, DataError
from cellcls.scoring.conformal import fit_conformal
from cellcls.scoring.heads import Decision, probabilities

BINS = 15
TARGETS = ("sensitivity", "specificity")


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|."""
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in reliability(y_true, probs, bins))
                 / max(len(y_true), 1))


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the one-hot truth (0 is
    perfect; for two classes twice scikit-learn's ``brier_score_loss`` of the positive class)."""
    onehot = np.eye(probs.shape[1])[y_true]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per confidence bin: its range, how many images, their mean confidence and their accuracy (the diagram)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                         "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    return rows


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``targets`` (LBFGS on log T, from T = 1)."""
    logits, targets = logits.detach().float().clone(), targets.long().clone()  # inference tensors cannot be traced
    log_t = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimiser.zero_grad()
        p = probabilities(logits / log_t.exp()).clamp_min(1e-12)
        loss = -p[torch.arange(len(targets)), targets].log().mean()
        loss.backward()
        return loss

    optimiser.step(nll)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def parse_operating_point(text: str) -> tuple[str, float]:
    """``sensitivity:0.95`` -> ("sensitivity", 0.95), with a clear error for anything else."""
    kind, _, level = str(text).partition(":")
    try:
        value = float(level)
    except ValueError:
        value = -1.0
    if kind not in TARGETS or not 0 < value < 1:
        raise ConfigError(f"operating_point={text!r}: expected sensitivity:<level> or specificity:<level> with the "
                          "level between 0 and 1, e.g. operating_point=sensitivity:0.95")
    return kind, value


def choose_threshold(y_true: np.ndarray, p_positive: np.ndarray, kind: str, level: float) -> float:
    """The threshold on class 1's probability that reaches ``level`` of ``kind`` on these cases, and otherwise gives
    up as little of the other rate as possible: the highest such threshold for sensitivity, the lowest for
    specificity."""
    positives, negatives = p_positive[y_true == 1], p_positive[y_true == 0]
    if len(positives) == 0 or len(negatives) == 0:
        raise DataError("an operating point needs both classes in the validation split")
    if kind == "sensitivity":
        # class 1 when p >= t: keep the k highest-scoring positives above t, k = ceil(level * n)
        k = int(np.ceil(level * len(positives) - 1e-9))
        return float(np.sort(positives)[::-1][k - 1])
    k = int(np.ceil(level * len(negatives) - 1e-9))
    return float(np.nextafter(np.sort(negatives)[k - 1], np.inf))


def fit_decision(
    logits: torch.Tensor, targets: torch.Tensor, calibrate: bool, operating_point: str | None, split: str = "val",
    conformal: float | None = None,
) -> Decision:
    """Fit the temperature (``calibrate``), the threshold (``operating_point``) and the prediction sets' threshold
    (``conformal``, a coverage level; on the calibrated probabilities) on one split's logits."""
    temperature = fit_temperature(logits, targets) if calibrate else 1.0
    threshold = None
    if operating_point:
        probs = probabilities(logits.float() / temperature).numpy()
        if probs.shape[1] != 2:
            raise ConfigError(f"operating_point={operating_point} needs two classes; this model has {probs.shape[1]}")
        kind, level = parse_operating_point(operating_point)
        threshold = choose_threshold(targets.numpy(), probs[:, 1], kind, level)
    decision = Decision(temperature, threshold, operating_point or None, f"{split} ({len(targets)} images)")
    if conformal is None:
        return decision
    fitted = fit_conformal(decision.probabilities(logits).numpy(), targets.numpy(), conformal)
    return replace(decision, set_level=float(conformal), set_method=fitted.method, set_threshold=fitted.threshold)
