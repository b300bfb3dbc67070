"""How ``python -m cellcls.serve`` builds its app, in one process or in each of ``workers=<n>``.

uvicorn starts each worker as a fresh process (spawn) and calls :func:`create_app_from_env` there: the settings
travel in one environment variable, so every worker loads the same model, read-only, with its own micro-batcher.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cellcls.deploy.predictor import Predictor, load_predictor
from cellcls.deploy.protocol import with_header_timeout
from cellcls.deploy.runtimes import ExportedModel
from cellcls.deploy.server import Classifier, Limits

ENV = "CELLCLS_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: str
    device: str = "auto"
    cam_layer: str | None = None
    limits: dict[str, float] = field(default_factory=dict)  # Limits fields the user set
    client_folder: str | None = None  # a format=web folder served at / (client_side=true)
    threads: int | None = None  # PyTorch's threads per process: the cores shared out between the workers

    def with_folder(self, folder: Path | None) -> ServeSettings:
        return replace(self, client_folder=None if folder is None else str(folder))

    def environment(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_environment(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV]))


def build(settings: ServeSettings, predictor: Predictor | None = None) -> tuple[Any, Classifier]:
    """The FastAPI app and its classifier (the model loaded unless ``predictor`` is given)."""
    from cellcls.deploy.webapp import create_app

    if settings.threads is not None:  # n workers each running a forward pass on every core would thrash
        import torch

        torch.set_num_threads(settings.threads)
    predictor = predictor if predictor is not None else load_predictor(settings.checkpoint, settings.device)
    classifier = Classifier(predictor, Limits(**settings.limits), settings.cam_layer)
    folder = Path(settings.client_folder) if settings.client_folder else None
    return create_app(classifier, folder), classifier


def create_app_from_env() -> Any:
    """uvicorn's app factory in each worker process."""
    return build(ServeSettings.from_environment())[0]


def web_folder(predictor: Predictor, runtime: str | None) -> Path:
    """A ``format=web`` folder of the served model in a temporary folder, removed when the server exits."""
    from cellcls.deploy.web_export import export_web, web_folder_of_exported

    tmp = Path(tempfile.mkdtemp(prefix="cellcls-client-"))
    atexit.register(shutil.rmtree, tmp, True)
    if isinstance(predictor, ExportedModel):
        return web_folder_of_exported(predictor.path, predictor.card, tmp / "web", runtime)
    return export_web(predictor, tmp / "web", runtime)


def protocol_from_env() -> type:
    """The HTTP protocol class with the header timeout of the settings in the environment (for the workers)."""
    limits = ServeSettings.from_environment().limits if ENV in os.environ else {}
    return with_header_timeout(limits.get("header_timeout_s", Limits().header_timeout_s))


# uvicorn imports the protocol of each worker by name, so it is a module attribute made from the environment
WorkerProtocol = protocol_from_env()
