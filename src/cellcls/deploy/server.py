"""The classifier behind ``python -m cellcls.serve``: uploads in, predictions (and Grad-CAM overlays) out, within
the upload limits."""

from __future__ import annotations

import base64
import binascii
import io
import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from cellcls.data.dataset import load_image
from cellcls.deploy.predictor import Predictor
from cellcls.errors import DataError
from cellcls.evaluation import plots
from cellcls.models.heads import labels_of


@dataclass(frozen=True)
class Limits:
    """What one upload may be: refused with a message beyond these, before any pixel is decoded."""

    max_image_mb: float = 20.0
    max_pixels: int = 50_000_000
    max_images: int = 32

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        # base64 grows a file by 4/3; allow some JSON around it
        return self.max_images * (self.max_image_bytes * 4 // 3 + 4096) + 65536


def _empty_result(name: str) -> dict[str, Any]:
    return {"name": name, "ok": False, "label": None, "confidence": None, "probabilities": None, "cam_png": None, "error": None}


class Classifier:
    """Turns uploaded bytes into predictions; one model call at a time (Grad-CAM hooks are not re-entrant)."""

    def __init__(self, predictor: Predictor, limits: Limits, cam_layer: str | None = None) -> None:
        self.predictor = predictor
        self.limits = limits
        self.cam_layer = cam_layer
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {**self.predictor.card, "gradcam": self.predictor.supports_cam, "limits": asdict(self.limits)}

    def decode(self, name: str, data: bytes) -> torch.Tensor:
        """The uploaded file as the model's uint8 input; DataError says why it cannot be."""
        if not data:
            raise DataError(f"{name} is empty (0 bytes)")
        if len(data) > self.limits.max_image_bytes:
            raise DataError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {self.limits.max_image_mb:g} MB per image")
        prep = self.predictor.preprocessing
        return load_image(io.BytesIO(data), prep["channels"], prep["image_size"], name=name, max_pixels=self.limits.max_pixels)

    def classify_base64(self, name: str, text: str, cam: bool = True) -> dict[str, Any]:
        """:meth:`classify` for a file sent as base64 text (the JSON API's form)."""
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return {**_empty_result(name), "error": f"{name}: data is not valid base64"}
        return self.classify(name, data, cam)

    def classify(self, name: str, data: bytes, cam: bool = True) -> dict[str, Any]:
        """One result row: the prediction, or ``ok: false`` and the reason."""
        result = _empty_result(name)
        try:
            image = self.decode(name, data)
        except DataError as exc:
            result["error"] = str(exc)
            return result
        batch = image.unsqueeze(0)
        classes = self.predictor.classes
        with self._lock:
            probs = self.predictor.predict(batch)[0]
            if cam and self.predictor.supports_cam:
                result["cam_png"] = self._cam_png(batch)
        best = int(labels_of(probs[None])[0])
        result.update(ok=True, label=classes[best], confidence=float(probs[best]),
                      probabilities={c: float(p) for c, p in zip(classes, probs)})
        return result

    def _cam_png(self, batch: torch.Tensor) -> str:
        from cellcls.evaluation.figures import cam_maps

        cam = cam_maps(self.predictor, batch.numpy(), self.cam_layer)[0]  # type: ignore[arg-type]
        buf = io.BytesIO()
        Image.fromarray(plots.cam_overlay(batch[0].numpy(), cam)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
