"""Running an exported model (ONNX through onnxruntime, or TorchScript) like a checkpoint.

The exported graph takes ``image``: float32 ``N x C x H x W`` in [0, 1] (pixel / 255, already resized to the
model's input size; ``N`` is dynamic) and returns ``probabilities`` (``N x classes``) and ``logits``, and for a model
with an out-of-distribution rule ``ood_score`` (``N``; above the card's ``ood.threshold``: flagged). The
normalisation the model was trained with is inside the graph. The model card (classes, input recipe, metrics) is
embedded (ONNX metadata property ``cellcls``, TorchScript extra file ``cellcls.json``) and written beside the model
as ``<model>.json``.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellcls.config.targets import check_targets
from cellcls.data.preprocessing import Preprocessing, to_unit
from cellcls.scoring.heads import Decision
from cellcls.scoring.multilabel import FindingRule

CARD_KEY = "cellcls"
TS_EXTRA = "cellcls.json"
OOD_OUTPUT = "ood_score"  # the third output of a model exported with an out-of-distribution rule


@contextmanager
def jit_quiet() -> Iterator[None]:
    """TorchScript still works but warns that it is deprecated on every call; the user asked for it by name.
    The tracer's warning about the head-size branch is moot: the number of logits is fixed per model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")


@dataclass
class ExportedModel:
    """An exported ONNX (run by onnxruntime) or TorchScript model, used like a :class:`LoadedModel`."""

    path: Path
    card: dict[str, Any]
    run: Any
    supports_cam = False

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def decision(self) -> Decision:
        """The decision rule fitted on validation, from the card (the temperature is inside the graph already)."""
        return Decision.of(self.card.get("decision"))

    @property
    def findings(self) -> FindingRule | None:
        """A multi-label model's per-finding thresholds, from the card (None: single-label classes)."""
        if self.card.get("task") != "multilabel":
            return None
        return FindingRule.of(self.card.get("decision"), len(self.classes))

    @property
    def threshold(self) -> float | None:
        """Two classes: class 1 when its probability reaches this (the operating point fitted on validation)."""
        return self.decision.threshold

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_input_spec(self.card["input"])

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``N x num_classes`` for uint8 images (``N x C x H x W``)."""
        return self.assess(images)[0]

    def assess(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and, when the model was exported with an out-of-distribution rule, which images lie
        outside what it was trained on (its score output above the card's threshold); None without one."""
        probs, score = self.run(to_unit(images).contiguous())
        rule = self.card.get("ood")
        flags = None if score is None or not rule else np.asarray(score) > float(rule["threshold"])
        return np.asarray(probs, dtype=np.float32), flags


def load_exported(path: Path, device: str = "auto") -> ExportedModel:
    """An exported model file; the card comes from inside it (or ``<file>.json`` beside it)."""
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, device)
    extra = {TS_EXTRA: ""}
    try:
        with jit_quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a TorchScript model: {exc}") from exc
    card = _checked(json.loads(extra[TS_EXTRA]) if extra[TS_EXTRA] else _sidecar(path), path)
    module.eval()

    @torch.inference_mode()
    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        out = module(x)
        return out[0].numpy(), out[2].numpy() if len(out) > 2 else None

    return ExportedModel(path, card, run)


def _load_onnx(path: Path, device: str) -> ExportedModel:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError(f"{path}: running ONNX models needs onnxruntime (pip install 'cellcls[deploy]')") from exc
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device in ("auto", "cuda") else ["CPUExecutionProvider"]
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    meta = session.get_modelmeta().custom_metadata_map
    card = _checked(json.loads(meta[CARD_KEY]) if CARD_KEY in meta else _sidecar(path), path)

    names = ["probabilities", *(o.name for o in session.get_outputs() if o.name == OOD_OUTPUT)]

    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        out = session.run(names, {"image": x.numpy()})
        return out[0], out[1] if len(out) > 1 else None

    return ExportedModel(path, card, run)


def _checked(card: Any, path: Path) -> dict[str, Any]:
    """A model card is data: one that is no JSON object, or names a class to create, is refused."""
    if not isinstance(card, dict):
        raise ValueError(f"{path}: its model card is not a JSON object; export the model again with python -m cellcls.export")
    check_targets(card, source=f"the model card of {path}")
    return card


def _sidecar(path: Path) -> dict[str, Any]:
    side = card_path(path)
    if not side.is_file():
        raise ValueError(f"{path} carries no cellcls model card and {side} does not exist; export it with python -m cellcls.export")
    return json.loads(side.read_text())


def is_exported(path: Path) -> bool:
    """An ONNX file, or a TorchScript archive (a zip holding ``*/constants.pkl`` or ``*/code/``)."""
    if path.suffix.lower() == ".onnx":
        return True
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith(f"extra/{TS_EXTRA}") or "/code/" in n for n in zf.namelist())


