"""``python -m cellcls.serve checkpoint=<checkpoint, run folder or exported model> [host=127.0.0.1] [port=8000]``

A local web app: upload cell or X-ray images and see, for each, the predicted class, a probability bar per class
and the Grad-CAM overlay (checkpoints only: an exported model has no gradients), beside the model's name, classes,
input size and validation metrics. Scripts use the same JSON API the page uses:

    GET  /api/info      the model card and the upload limits
    POST /api/predict   {"images": [{"name": "cell.png", "data": "<base64 of the file>"}], "cam": true}
                        -> {"results": [{"name", "ok", "label", "confidence", "probabilities": {class: p},
                                         "cam_png": "<base64 PNG>" or null, "error": null or "why"}]}
    GET  /health        {"status": "ok"}

Uploads are decoded in memory and never written to disk. Other settings: device=auto|cpu|cuda,
max_image_mb=<per file, default 20>, max_pixels=<width x height, default 50000000>, max_images=<per request,
default 32>, cam_layer=<layer name>. It binds to 127.0.0.1 unless host= says otherwise.
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cellcls import plots
from cellcls.cli import command_args, fail, own_settings
from cellcls.data.dataset import load_image
from cellcls.errors import ConfigError, DataError
from cellcls.exported import Predictor, load_predictor

SETTINGS = ("checkpoint", "host", "port", "device", "max_image_mb", "max_pixels", "max_images", "cam_layer")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        best = int(np.argmax(probs))
        result.update(ok=True, label=classes[best], confidence=float(probs[best]),
                      probabilities={c: float(p) for c, p in zip(classes, probs)})
        return result

    def _cam_png(self, batch: torch.Tensor) -> str:
        from cellcls.figures import cam_maps

        cam = cam_maps(self.predictor, batch.numpy(), self.cam_layer)[0]  # type: ignore[arg-type]
        buf = io.BytesIO()
        Image.fromarray(plots.cam_overlay(batch[0].numpy(), cam)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "serve", required=("checkpoint",))
        limits = Limits(float(own.get("max_image_mb", 20)), int(float(own.get("max_pixels", 50_000_000))),
                        int(own.get("max_images", 32)))
        if limits.max_image_mb <= 0 or limits.max_pixels <= 0 or limits.max_images <= 0:
            raise ConfigError("max_image_mb, max_pixels and max_images must be positive")
        host, port = own.get("host", "127.0.0.1"), int(own.get("port", 8000))
        classifier = Classifier(load_predictor(own["checkpoint"], own.get("device", "auto")), limits, own.get("cam_layer"))
        from cellcls.webapp import create_app

        app = create_app(classifier)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    except ImportError as exc:
        return fail(ImportError(f"serve needs FastAPI and uvicorn: pip install 'cellcls[deploy]' ({exc})"))
    import uvicorn

    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the app (no authentication)",
              file=sys.stderr)
    card = classifier.predictor.card
    print(f"cellcls: serving {card['model']} ({', '.join(card['classes'])}) from {classifier.predictor.path}", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host

    # uvicorn binds inside run(); print the address (the real port for port=0) once it listens, for people and scripts
    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            print(f"cellcls: open http://{url_host}:{bound}/ (JSON API at /api/predict, schema at /docs; Ctrl+C stops)",
                  flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
