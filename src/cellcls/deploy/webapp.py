"""The web app of ``python -m cellcls.serve``: the page at ``/`` and the API under ``/api``.

FastAPI because the page and scripts share one endpoint with a typed schema (documented at ``/docs``) and uvicorn
serves it; the page is one static HTML file with no outside assets, so it works offline. ``/api/predict`` takes a
file three ways: base64 inside JSON (the page's form), ``multipart/form-data`` (``curl -F file=@cell.png``) and the
raw image as the body (``curl --data-binary @cell.png -H 'Content-Type: image/png'``); all three meet the same
limits and give the same results. Uploads stay in memory (multipart parts too: they never spool to disk).
"""
# No ``from __future__ import annotations`` here: FastAPI reads the request models from the annotations at runtime.

import asyncio
import os
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles

from cellcls.deploy.server import Classifier

JSON, MULTIPART = "application/json", "multipart/form-data"
RAW = ("image/", "application/octet-stream", "application/dicom")  # a body that is the file itself
FORMS = ("application/json ({\"images\": [{\"name\", \"data\": base64}]}), multipart/form-data (file fields: "
         "curl -F file=@cell.png) or the image itself (curl --data-binary @cell.png -H 'Content-Type: image/png')")


class Upload(BaseModel):
    name: str = Field(max_length=255, description="the file's name, used in messages")
    data: str = Field(description="the file's bytes, base64-encoded")


class PredictRequest(BaseModel):
    images: list[Upload]
    cam: bool = Field(True, description="return a Grad-CAM overlay per image (checkpoints only)")


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 (announced by Content-Length or sent chunked) before it
    is buffered; a body that does not arrive within ``timeout`` seconds gets 408; a POST in none of the three forms
    gets 415."""

    def __init__(self, app: Any, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    def _too_large(self, size: int) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"request body is over {self.limit / 2**20:.1f} MB (got {size / 2**20:.1f} MB or more)")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await JSONResponse({"detail": self._too_large(int(length)).detail}, status_code=413)(scope, receive, send)
            return
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and not accepted(kind.decode("latin-1")):
            detail = f"the API takes {FORMS}; not {kind.decode('latin-1') or 'a body without a Content-Type'}"
            await JSONResponse({"detail": detail}, status_code=415)(scope, receive, send)
            return
        received = 0
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def counted() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0.001))
            except TimeoutError:
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large(received)
            return message

        await self.app(scope, counted, send)


def accepted(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind in (JSON, MULTIPART) or kind.startswith(RAW)


class InMemoryParts(MultiPartParser):
    """Starlette's multipart parser with file parts kept in memory up to the body limit (its default spools parts
    over 1 MB to a temporary file: an uploaded patient image must not touch the disk)."""

    def __init__(self, *args: Any, spool: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spool_max_size = spool


async def uploads(request: Request, limits: Any, cam: bool) -> tuple[list[tuple[str, bytes | str]], bool]:
    """The files of a request in any of the three forms, as ``(name, bytes)`` or ``(name, base64 text)`` (JSON),
    and whether to draw Grad-CAM (a JSON body says it itself); HTTPException (422/413) says what is wrong."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == JSON:
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None  # FastAPI's usual 422
        files: list[tuple[str, bytes | str]] = [(u.name, u.data) for u in body.images]
        cam = body.cam
    elif kind == MULTIPART:
        parser = InMemoryParts(request.headers, request.stream(), max_files=limits.max_images, max_fields=16,
                               spool=limits.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            if "too many files" in exc.message.lower():
                raise HTTPException(413, f"more than {limits.max_images} images in one request; the limit is {limits.max_images}") from None
            raise HTTPException(422, f"multipart body: {exc.message}") from None
        parts = [(key, v) for key, v in form.multi_items() if isinstance(v, UploadFile)]
        if not parts:
            raise HTTPException(422, "the multipart body has no file field: send each image as file=@<path> (curl -F)")
        files = [(v.filename or key, await v.read()) for key, v in parts]
    else:
        files = [(request.query_params.get("name") or request.headers.get("x-filename") or "upload", await request.body())]
    if not files:
        raise HTTPException(422, "images is empty: send at least one {name, data} object")
    if len(files) > limits.max_images:
        raise HTTPException(413, f"{len(files)} images in one request; the limit is {limits.max_images}")
    return files, cam


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` references replaced by the definitions (OpenAPI resolves ``$ref``
    from the document root, where pydantic's ``#/$defs/...`` do not exist)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            return walk(defs[ref.rsplit("/", 1)[-1]]) if ref.startswith("#/$defs/") else {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


PREDICT_BODY = {  # the three request forms, for /docs
    "required": True,
    "content": {
        JSON: {"schema": _inlined(PredictRequest.model_json_schema())},
        MULTIPART: {"schema": {"type": "object", "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                               "required": ["file"]}, "encoding": {"file": {"contentType": "image/*, application/dicom"}}},
        "image/*": {"schema": {"type": "string", "format": "binary"},
                    "description": "the file itself; its name from ?name= or an X-Filename header"},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def create_app(classifier: Classifier, client_folder: Path | None = None) -> FastAPI:
    """The FastAPI application: the page at ``/`` and the API under ``/api``. With ``client_folder`` (a
    ``format=web`` export) the page at ``/`` is that folder's: the server hands the model to the browser, which
    classifies the images itself (the API stays for scripts)."""
    app = FastAPI(title="cellcls", summary=f"{classifier.predictor.card['model']} on {', '.join(classifier.predictor.classes)}")
    page = resources.files("cellcls.deploy.web").joinpath("index.html").read_text(encoding="utf-8")

    app.add_middleware(BodyLimit, limit=classifier.limits.max_body_bytes, timeout=classifier.limits.body_timeout_s)

    if client_folder is None:
        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        def index() -> str:
            return page

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        """Readiness: the model is loaded and its batcher runs (503 after the batcher died); ``pid`` names the worker."""
        up = classifier.batcher.alive
        return JSONResponse({"status": "ready" if up else "not ready", "pid": os.getpid()}, status_code=200 if up else 503)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return classifier.info()

    @app.post("/api/predict", openapi_extra={"requestBody": PREDICT_BODY})
    async def predict(request: Request, cam: bool = Query(True, description="Grad-CAM overlays for multipart and raw bodies")
                      ) -> dict[str, Any]:
        files, draw = await uploads(request, classifier.limits, cam)

        def run() -> list[dict[str, Any]]:  # in a worker thread: each waits for the micro-batcher
            return [classifier.classify_base64(name, data, draw) if isinstance(data, str) else classifier.classify(name, data, draw)
                    for name, data in files]

        return {"results": await run_in_threadpool(run)}

    if client_folder is not None:
        app.mount("/", StaticFiles(directory=client_folder, html=True), name="client")
    return app
