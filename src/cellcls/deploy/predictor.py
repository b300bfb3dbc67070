"""What predict and serve use: a checkpoint or an exported model behind one interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cellcls.data.preprocessing import Preprocessing
from cellcls.deploy.runtimes import is_exported, load_exported
from cellcls.errors import ConfigError
from cellcls.models.trained import load_model
from cellcls.scoring.heads import Decision
from cellcls.scoring.multilabel import FindingRule
from cellcls.models.tta import check_tta


class Predictor(Protocol):
    """What predict and serve need of a model, whether a checkpoint or an exported file."""

    classes: list[str]
    preprocessing: Preprocessing
    path: Path
    supports_cam: bool
    threshold: float | None  # two classes: class 1 when its probability reaches it; None: the arg-max
    decision: Decision  # the whole rule fitted on validation: temperature, threshold, prediction sets
    findings: FindingRule | None  # a multi-label model's per-finding thresholds; None for single-label classes

    @property
    def card(self) -> dict[str, Any]: ...

    def predict(self, images: torch.Tensor) -> np.ndarray: ...

    def assess(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities, and which images are outside what the model was trained on (None: no rule)."""
        ...


def load_predictor(location: str | Path, device: str = "auto", tta: str | None = None) -> Predictor:
    """A checkpoint, a run folder (its best.pt) or an exported ONNX/TorchScript file, ready to predict; ``tta``
    (test-time flips, checkpoints only) averages each image's logits over its flipped copies."""
    path = Path(location).expanduser()
    if path.is_file() and is_exported(path):
        if tta is not None and check_tta(tta) != "none":
            raise ConfigError(f"tta={tta} runs on a PyTorch checkpoint; {path} is an exported model (give its "
                              "checkpoint or run folder)")
        return load_exported(path, device)
    if path.suffix.lower() == ".onnx":
        raise FileNotFoundError(f"checkpoint={path}: no such ONNX file")
    return load_model(path, device, tta)
