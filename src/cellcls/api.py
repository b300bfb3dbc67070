"""The Python API for notebooks and scripts: train a model with the same overrides as the command line, load a
trained one and classify images.

    import cellcls
    run = cellcls.train(["experiment=s1_malaria_lenet", "dataset.root=/data/malaria", "trainer.max_epochs=5"])
    model = cellcls.load(run.folder)               # a run folder, a checkpoint, or an exported .onnx file
    model.predict(["cell1.png", "cell2.png"])      # ["Parasitized", "Uninfected"]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellcls.data.dataset import load_image
from cellcls.deploy.predictor import Predictor, load_predictor
from cellcls.scoring.heads import labels_of

ImageInput = str | Path | np.ndarray | torch.Tensor


@dataclass
class RunResult:
    """A finished training run: its folder and its summary (monitored metric, best epoch, test metrics)."""

    folder: Path
    summary: dict[str, Any]

    @property
    def test_accuracy(self) -> float | None:
        return (self.summary.get("test") or {}).get("accuracy")


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> RunResult:
    """Train as ``python -m cellcls.train <overrides>`` would, into ``run_dir`` (default:
    ``outputs/<date>/<time>_<dataset>_<model>``), in this process. Bad settings raise ``ConfigError``."""
    from cellcls.config import check_command_line, compose_config
    from cellcls.training.run import train as run_training

    check_command_line(list(overrides))
    cfg = compose_config(list(overrides))
    if run_dir is None:
        now = datetime.now()
        run_dir = Path("outputs") / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{cfg.dataset.name}_{cfg.model.name}"
    folder = Path(run_dir)
    return RunResult(folder, run_training(cfg, folder, list(overrides)))


class Model:
    """A trained model (checkpoint or exported file) that takes image files or arrays."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def card(self) -> dict[str, Any]:
        """Name, classes, input recipe and metrics of the model."""
        return self.predictor.card

    def _batch(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> torch.Tensor:
        prep = self.predictor.preprocessing
        if isinstance(images, (str, Path)):  # one file, not a sequence of one-letter names
            images = [images]
        if isinstance(images, (np.ndarray, torch.Tensor)) and np.ndim(images) == 4:
            batch = torch.as_tensor(np.asarray(images))
        else:
            batch = torch.stack([load_image(Path(i), prep.channels, prep.image_size, window=prep.window)
                                 if isinstance(i, (str, Path)) else torch.as_tensor(np.asarray(i)) for i in images])
        want = (int(prep.channels), *(int(s) for s in prep.image_size))
        if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != want:
            raise ValueError(f"arrays must be uint8 N x {want[0]} x {want[1]} x {want[2]} (decoded and resized as in "
                             f"training); got {batch.dtype} {tuple(batch.shape)}; pass file paths to have them decoded")
        return batch

    def predict_proba(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities ``N x classes`` for image files (decoded exactly as in training) or uint8 arrays
        ``N x C x H x W`` at the model's input size; one path gives one row, an empty list none."""
        if not isinstance(images, (str, Path, np.ndarray, torch.Tensor)) and len(images) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return self.predictor.predict(self._batch(images))

    def predict(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list[str]:
        """The predicted class name of each image; for a multi-label model its findings as ChestX-ray14 writes them
        (``Effusion|Mass``, ``No Finding``; :meth:`predict_findings` gives them as lists)."""
        probs = self.predict_proba(images)
        rule = self.predictor.findings
        if rule is not None:
            return rule.names(probs, self.classes)
        return [self.classes[i] for i in labels_of(probs, self.predictor.threshold)]

    def predict_findings(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list[list[str]]:
        """A multi-label model's findings for each image, each at its threshold fitted on validation; a
        single-label model: ValueError."""
        rule = self.predictor.findings
        if rule is None:
            raise ValueError(f"{self.predictor.path} is a single-label model (one class per image); use predict()")
        return [[c for c, m in zip(self.classes, row, strict=True) if m]
                for row in rule.findings(self.predict_proba(images))]

    def predict_set(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list[list[str]]:
        """Each image's conformal prediction set: the classes it may be, holding the true one with the coverage
        the model was fitted for (``conformal=`` in training; every class: cannot tell). A model trained without
        ``conformal`` has no set rule: ValueError."""
        members = self.predictor.decision.sets(self.predict_proba(images))
        if members is None:
            raise ValueError(f"{self.predictor.path} has no prediction-set rule; train it with conformal=0.95 (or "
                             "another coverage level) to have one")
        return [[c for c, m in zip(self.classes, row) if m] for row in members]

    def outside(self, images: Sequence[ImageInput] | np.ndarray | torch.Tensor) -> list[bool]:
        """For each image, whether it lies outside what the model was trained on (its activation statistics far
        from the training images'; fitted with ``ood=`` in training). A model without that rule: ValueError."""
        if not isinstance(images, (str, Path, np.ndarray, torch.Tensor)) and len(images) == 0:
            return []
        _, flags = self.predictor.assess(self._batch(images))
        if flags is None:
            raise ValueError(f"{self.predictor.path} has no out-of-distribution rule; train it with ood=0.95, or run "
                             "python -m cellcls.calibrate checkpoint=<run> ood=0.95 (exported models carry none)")
        return [bool(f) for f in flags]


def load(location: str | Path, device: str = "auto") -> Model:
    """A run folder (its ``checkpoints/best.pt``), a checkpoint file, or an exported ONNX/TorchScript model."""
    return Model(load_predictor(location, device))
