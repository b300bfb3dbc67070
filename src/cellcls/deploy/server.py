"""The classifier behind ``python -m cellcls.serve``: uploads in, predictions (and Grad-CAM overlays) out, within
the upload limits."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cellcls.data.dataset import load_image
from cellcls.data.decode import image_header, max_pixels
from cellcls.data.reference import unusual
from cellcls.deploy.predict import OUTSIDE
from cellcls.deploy.batching import MicroBatcher
from cellcls.deploy.predictor import Predictor
from cellcls.errors import DataError
from cellcls.infra import plots
from cellcls.scoring.heads import labels_of


@dataclass(frozen=True)
class Limits:
    """What a request may be and how long it may take: refused with a message beyond these, before any pixel is
    decoded. The body limit follows from the image limits (8 images of 10 MB: about 107 MB of JSON)."""

    max_image_mb: float = 10.0
    max_pixels: int = field(default_factory=max_pixels)
    max_images: int = 8
    header_timeout_s: float = 10.0  # from connecting to the end of the request's headers
    body_timeout_s: float = 30.0  # the whole body, however it trickles in
    keep_alive_s: float = 5.0  # an idle connection between requests
    model_timeout_s: float = 120.0  # one request's wait for the model (queue + forward pass)
    max_batch: int = 32  # images per forward pass of the micro-batcher
    uncertain_margin: float = 0.2  # a top class less than this ahead of the second is shown as uncertain

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        # base64 grows a file by 4/3; allow some JSON around it
        return self.max_images * (self.max_image_bytes * 4 // 3 + 4096) + 65536


def shown_path(path: str | None) -> str | None:
    """A checkpoint's path as clients see it: its run folder and name only, since a full path would show them the
    server's file layout."""
    return "/".join(Path(path).parts[-3:]) if path else path


def _empty_result(name: str) -> dict[str, Any]:
    return {"name": name, "ok": False, "label": None, "confidence": None, "probabilities": None, "uncertain": None,
            "warnings": [], "cam_png": None, "error": None}


class Classifier:
    """Turns uploaded bytes into predictions: uploads are decoded in the request's thread, the model runs in the
    micro-batcher's (concurrent requests share one forward pass)."""

    def __init__(self, predictor: Predictor, limits: Limits, cam_layer: str | None = None) -> None:
        self.predictor = predictor
        self.limits = limits
        self.cam_layer = cam_layer
        self.batcher = MicroBatcher(predictor, limits.max_batch, cam_layer)

    def info(self) -> dict[str, Any]:
        """The model card for clients, with the upload limits."""
        card = {**self.predictor.card, "checkpoint": shown_path(self.predictor.card.get("checkpoint"))}
        return {**card, "gradcam": self.predictor.supports_cam, "limits": asdict(self.limits)}

    def decode(self, name: str, data: bytes) -> torch.Tensor:
        """The uploaded file as the model's uint8 input; DataError says why it cannot be."""
        if not data:
            raise DataError(f"{name} is empty (0 bytes)")
        if len(data) > self.limits.max_image_bytes:
            raise DataError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {self.limits.max_image_mb:g} MB per image")
        prep = self.predictor.preprocessing
        return load_image(io.BytesIO(data), prep.channels, prep.image_size, name=name, limit=self.limits.max_pixels,
                          window=prep.window)

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
        future = self.batcher.submit(image, cam)
        result["warnings"] = self.unusual(data, image)  # while the model runs
        probs, cam_map, outside = future.result(timeout=self.limits.model_timeout_s)
        if cam_map is not None:
            buf = io.BytesIO()
            Image.fromarray(plots.cam_overlay(image.numpy(), cam_map)).save(buf, format="PNG")
            result["cam_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        classes = self.predictor.classes
        if self.predictor.findings is not None:
            result.update(self.findings_result(probs))
            return result
        best = int(labels_of(probs[None], self.predictor.threshold)[0])
        runner_up = float(np.sort(probs)[-2])
        result.update(ok=True, label=classes[best], confidence=float(probs[best]),
                      probabilities={c: float(p) for c, p in zip(classes, probs)},
                      uncertain=bool(float(probs[best]) - runner_up < self.limits.uncertain_margin))
        members = self.predictor.decision.sets(probs[None])
        if members is not None:  # the conformal prediction set: every class in it means "cannot tell"
            result["prediction_set"] = {"classes": [c for c, m in zip(classes, members[0]) if m],
                                        "level": self.predictor.decision.set_level}
            result["uncertain"] = result["uncertain"] or bool(members[0].sum() > 1)
        if outside is not None:  # the out-of-distribution flag: the image is unlike every training image
            result["outside"] = outside
            if outside:
                result["warnings"] = [*result["warnings"], f"{OUTSIDE} (its activation statistics are far from the training images')"]
        return result

    def findings_result(self, probs: np.ndarray) -> dict[str, Any]:
        """A multi-label model's answer: the findings at their thresholds (``label`` as ChestX-ray14 writes them),
        every finding's probability, and as ``confidence`` the weakest of its per-finding decisions (p for a finding
        called present, 1 - p for one called absent); uncertain when a probability is within half the margin of
        its threshold."""
        rule, classes = self.predictor.findings, self.predictor.classes
        assert rule is not None
        present = rule.findings(probs[None])[0]
        sure = np.where(present, probs, 1 - probs)
        near = np.abs(probs - np.asarray(rule.thresholds)) < self.limits.uncertain_margin / 2
        return {"ok": True, "label": rule.names(probs[None], classes)[0],
                "findings": [c for c, m in zip(classes, present, strict=True) if m],
                "thresholds": dict(zip(classes, rule.thresholds, strict=True)), "confidence": float(sure.min()),
                "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
                "uncertain": bool(near.any())}

    def unusual(self, data: bytes, image: torch.Tensor) -> list[str]:
        """Ways the upload is far from the training images (shown as warnings; the image is still classified)."""
        reference = self.predictor.preprocessing.reference or {}
        if not reference:
            return []
        width, height, mode = image_header(io.BytesIO(data))
        return unusual(reference, width, height, mode, image.numpy())
