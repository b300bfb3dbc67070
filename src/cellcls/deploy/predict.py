"""Predicting image files with a checkpoint or an exported model: decoded exactly as in training, in batches,
unreadable files skipped with their reason, optional Grad-CAM overlays."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cellcls.data.dataset import load_image
from cellcls.data.layouts.folders import IMAGE_EXTENSIONS, visible_entries
from cellcls.data.layouts.table import is_table, table_paths
from cellcls.deploy.predictor import Predictor
from cellcls.errors import DataError, printable
from cellcls.infra import plots
from cellcls.evaluation.figures import cam_maps
from cellcls.scoring.heads import Decision
from cellcls.scoring.multilabel import FindingRule
from cellcls.models.trained import LoadedModel


@dataclass
class Prediction:
    file: Path
    probabilities: np.ndarray
    decision: Decision = field(default_factory=Decision)  # the model's threshold and prediction-set rule
    outside: bool | None = None  # outside what the model was trained on (None: the model has no such rule)
    findings: FindingRule | None = None  # a multi-label model's thresholds: its findings, not one class

    def label(self, classes: Sequence[str]) -> str:
        """The predicted class, or a multi-label model's findings (``Effusion|Mass``, ``No Finding``)."""
        if self.findings is not None:
            return self.findings.names(self.probabilities[None], classes)[0]
        return classes[int(self.decision.labels(self.probabilities[None])[0])]

    def prediction_set(self, classes: Sequence[str]) -> list[str] | None:
        """The classes this image may be (conformal prediction set), or None when the model has no set rule."""
        members = self.decision.sets(self.probabilities[None])
        return None if members is None else [c for c, m in zip(classes, members[0]) if m]

    def line(self, classes: Sequence[str]) -> str:
        label = self.label(classes)
        if self.findings is not None:  # every finding's probability: each is a separate question
            each = ", ".join(f"{c} {100 * p:.1f}%" for c, p in zip(classes, self.probabilities, strict=True))
            return f"{printable(self.file)}: {label} ({each})" + (f"  [{OUTSIDE}]" if self.outside else "")
        text = f"{printable(self.file)}: {label} ({100 * self.probabilities[list(classes).index(label)]:.2f}%)"
        text += describe_set(self.prediction_set(classes), len(classes), self.decision.set_level)
        return text + (f"  [{OUTSIDE}]" if self.outside else "")


OUTSIDE = "outside what this model was trained on"


def describe_set(members: Sequence[str] | None, num_classes: int, level: float | None) -> str:
    """How a printed prediction shows its set: ``  set {Parasitized} at 95%``, or ``cannot tell`` when every class
    is in it."""
    if members is None:
        return ""
    verdict = "; cannot tell" if len(members) == num_classes else ""
    return f"  set {{{', '.join(members)}}} at {100 * (level or 0):g}%{verdict}"


def list_inputs(location: Path, column: str = "path", template: str | None = None) -> list[Path]:
    """The image file, every image below the folder (sorted; other files are left alone), or the images a table
    (CSV/Parquet) lists in ``column`` (or by ``template``), relative to its folder, in its order."""
    if is_table(location):
        return table_paths(location, column, template)
    if location.is_file():
        return [location]
    if location.is_dir():
        return [p for p in visible_entries(location) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    raise FileNotFoundError(f"input={location}: no such file or folder")


def predict_files(
    loaded: Predictor, files: Sequence[Path], batch_size: int = 64, cam_dir: Path | None = None, cam_layer: str | None = None
) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Probabilities for each readable file (decoded exactly as in training), and the files skipped with why."""
    prep = loaded.preprocessing
    results: list[Prediction] = []
    skipped: list[tuple[Path, str]] = []
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(load_image(path, prep.channels, prep.image_size, window=prep.window))
                chunk.append(path)
            except DataError as exc:
                skipped.append((path, str(exc.__cause__ or exc)))
        if not images:
            continue
        batch = torch.stack(images)
        probs, outside = loaded.assess(batch)
        results += [Prediction(p, pr, loaded.decision, None if outside is None else bool(out), loaded.findings)
                    for p, pr, out in zip(chunk, probs, outside if outside is not None else [None] * len(chunk))]
        if cam_dir is not None:
            cam_dir.mkdir(parents=True, exist_ok=True)
            assert isinstance(loaded, LoadedModel), "Grad-CAM needs a PyTorch checkpoint"
            maps = cam_maps(loaded, batch.numpy(), cam_layer)
            for path, image, cam in zip(chunk, batch.numpy(), maps):
                Image.fromarray(plots.cam_overlay(image, cam)).save(cam_dir / f"{path.stem}_cam.png")
    return results, skipped


def write_csv(path: Path, predictions: Sequence[Prediction], classes: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:  # any file name
        writer = csv.writer(fh)
        sets = bool(predictions) and predictions[0].decision.has_sets
        flagged = bool(predictions) and predictions[0].outside is not None
        writer.writerow(["file", "predicted", *[f"p_{c}" for c in classes], *(["set"] if sets else []),
                         *(["outside"] if flagged else [])])
        for pred in predictions:
            members = pred.prediction_set(classes) if sets else None
            writer.writerow([str(pred.file), pred.label(classes), *[f"{v:.6f}" for v in pred.probabilities],
                             *(["|".join(members)] if members is not None else []),
                             *([str(pred.outside).lower()] if flagged else [])])
