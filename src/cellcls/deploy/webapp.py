"""The web app of ``python -m cellcls.serve``: the page at ``/`` and the JSON API under ``/api``.

FastAPI because the page and scripts share one JSON endpoint with a typed request schema (documented at ``/docs``)
and uvicorn serves it; the page is one static HTML file with no outside assets, so it works offline.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the request models from the annotations at runtime.

import asyncio
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from cellcls.deploy.server import Classifier


class Upload(BaseModel):
    name: str = Field(max_length=255, description="the file's name, used in messages")
    data: str = Field(description="the file's bytes, base64-encoded")


class PredictRequest(BaseModel):
    images: list[Upload]
    cam: bool = Field(True, description="return a Grad-CAM overlay per image (checkpoints only)")


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 (announced by Content-Length or sent chunked) before it
    is buffered; a body that does not arrive within ``timeout`` seconds gets 408; a POST that is not JSON gets 415
    (the API takes base64 in JSON, not multipart forms)."""

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
        if scope["method"] == "POST" and kind != b"application/json":
            detail = (f"the API takes application/json ({{\"images\": [{{\"name\", \"data\": base64}}]}}), "
                      f"not {kind.decode('latin-1') or 'a body without a Content-Type'}")
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


def create_app(classifier: Classifier) -> FastAPI:
    """The FastAPI application: the page at ``/`` and the JSON API under ``/api``."""
    app = FastAPI(title="cellcls", summary=f"{classifier.predictor.card['model']} on {', '.join(classifier.predictor.classes)}")
    page = resources.files("cellcls.deploy.web").joinpath("index.html").read_text(encoding="utf-8")

    app.add_middleware(BodyLimit, limit=classifier.limits.max_body_bytes, timeout=classifier.limits.body_timeout_s)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return classifier.info()

    @app.post("/api/predict")
    def predict(body: PredictRequest) -> dict[str, Any]:
        if not body.images:
            raise HTTPException(422, "images is empty: send at least one {name, data} object")
        if len(body.images) > classifier.limits.max_images:
            raise HTTPException(413, f"{len(body.images)} images in one request; the limit is {classifier.limits.max_images}")
        return {"results": [classifier.classify_base64(u.name, u.data, body.cam) for u in body.images]}

    return app
