"""Per-patient results: one prediction per patient from the predictions of their images, the way screening is
judged (a malaria patient is infected when any of their cells is)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellcls.errors import ConfigError
from cellcls.infra.run_folder import write_csv

RULES = ("auto", "max", "mean")


def aggregate(
    y_true: np.ndarray, probs: np.ndarray, groups: Sequence[str], rule: str = "auto"
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Patients (sorted), their true class, their class probabilities and their number of images.

    ``max`` (the default for two classes): a patient is positive when any image is, scored by the highest
    probability of class 1 among their images. ``mean`` (the default for more classes): the patient's class is the
    most frequent true class of their images, scored by the mean probabilities (a soft vote).
    """
    if rule not in RULES:
        raise ConfigError(f"group_rule={rule!r} is not valid; allowed values: {', '.join(RULES)}")
    binary = probs.shape[1] == 2
    rule = ("max" if binary else "mean") if rule == "auto" else rule
    if rule == "max" and not binary:
        raise ConfigError("group_rule=max needs two classes (a positive class); use group_rule=mean")
    names, codes = np.unique(np.asarray(groups), return_inverse=True)
    truth = np.zeros(len(names), int)
    scores = np.zeros((len(names), probs.shape[1]))
    counts = np.bincount(codes, minlength=len(names))
    for g in range(len(names)):
        members = codes == g
        if rule == "max":
            truth[g] = int(y_true[members].max())
            p = float(probs[members, 1].max())
            scores[g] = [1 - p, p]
        else:
            truth[g] = int(np.bincount(y_true[members]).argmax())
            scores[g] = probs[members].mean(axis=0)
    return [str(n) for n in names], truth, scores, counts


def write_patients(path: Path, names: Sequence[str], truth: np.ndarray, scores: np.ndarray, counts: np.ndarray,
                   predicted: np.ndarray, classes: Sequence[str]) -> Path:
    """``patients.csv``: one row per patient with their images, true and predicted class and probabilities."""
    rows = [{"patient": n, "images": int(c), "true": classes[t], "predicted": classes[p],
             **{f"p_{cls}": f"{v:.6f}" for cls, v in zip(classes, s)}}
            for n, c, t, p, s in zip(names, counts, truth, predicted, scores)]
    return write_csv(path, rows, columns=("patient", "images", "true", "predicted"))
