"""Exporting a trained model to ONNX or TorchScript, and running an exported model like a checkpoint.

The exported graph takes ``image``: float32 ``N x C x H x W`` in [0, 1] (pixel / 255, already resized to the
model's input size; ``N`` is dynamic) and returns ``probabilities`` (``N x classes``) and ``logits``. The
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
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cellcls.inference import LoadedModel, load_model
from cellcls.losses import probabilities
from cellcls.models import num_outputs

EXPORT_FORMAT = "cellcls-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
CARD_KEY = "cellcls"
TS_EXTRA = "cellcls.json"


class Predictor(Protocol):
    """What predict and serve need of a model, whether a checkpoint or an exported file."""

    classes: list[str]
    preprocessing: dict[str, Any]
    path: Path
    supports_cam: bool

    @property
    def card(self) -> dict[str, Any]: ...

    def predict(self, images: torch.Tensor) -> np.ndarray: ...


class ExportModule(nn.Module):
    """The trained network with its normalisation in front and the probability function behind."""

    def __init__(self, model: nn.Module, mean: list[float] | None, std: list[float] | None) -> None:
        super().__init__()
        self.model = model
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.mean) / self.std if self.normalize else image
        logits = self.model(x)
        return probabilities(logits), logits


def export_card(loaded: LoadedModel, fmt: str) -> dict[str, Any]:
    """The checkpoint's model card plus how to call the exported graph."""
    card = loaded.card
    spec = card["input"]
    single_logit = bool(loaded.config.model.get("single_logit", False)) if "model" in loaded.config else False
    card.update(
        format=EXPORT_FORMAT,
        exported_as=fmt,
        graph={
            "input": {"name": "image", "dtype": "float32", "shape": ["N", spec["channels"], spec["height"], spec["width"]],
                      "range": [0.0, 1.0], "normalization": "inside the graph" if spec["mean"] is not None else "none"},
            "outputs": [{"name": "probabilities", "shape": ["N", len(loaded.classes)]},
                        {"name": "logits", "shape": ["N", num_outputs(len(loaded.classes), single_logit)]}],
        },
    )
    return card


def default_output(loaded: LoadedModel, fmt: str) -> Path:
    """``<run>/export/model.onnx`` (or ``model.torchscript.pt``) beside the checkpoint's run folder."""
    return loaded.run_dir / "export" / f"model{SUFFIXES[fmt]}"


def export_model(loaded: LoadedModel, fmt: str, output: Path, opset: int = 18) -> Path:
    """Write ``loaded`` as ``fmt`` to ``output`` (and the card to ``<output>.json``); returns the model's path."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not valid; allowed values: {', '.join(FORMATS)}")
    prep = loaded.preprocessing
    module = ExportModule(loaded.model, prep.get("mean"), prep.get("std")).to("cpu").eval()
    height, width = (int(v) for v in prep["image_size"])
    example = torch.rand(2, int(prep["channels"]), height, width)
    card = export_card(loaded, fmt)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    try:
        if fmt == "onnx":
            _export_onnx(module, example, tmp, card, opset)
        else:
            with torch.no_grad(), _jit_quiet():
                traced = torch.jit.trace(module, example)
                torch.jit.save(traced, str(tmp), _extra_files={TS_EXTRA: json.dumps(card)})
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
        loaded.model.to(loaded.device)
    card_path(output).write_text(json.dumps(card, indent=2) + "\n")
    return output


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path, card: dict[str, Any], opset: int) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (example,), input_names=["image"], output_names=["probabilities", "logits"],
        dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True, verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    onnx.save(proto, str(path))


@contextmanager
def _jit_quiet() -> Iterator[None]:
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
    def preprocessing(self) -> dict[str, Any]:
        spec = self.card["input"]
        return {"channels": spec["channels"], "image_size": [spec["height"], spec["width"]], "mean": spec["mean"], "std": spec["std"]}

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``N x num_classes`` for uint8 images (``N x C x H x W``)."""
        return np.asarray(self.run(images.float().div(255.0).contiguous()), dtype=np.float32)


def load_exported(path: Path, device: str = "auto") -> ExportedModel:
    """An exported model file; the card comes from inside it (or ``<file>.json`` beside it)."""
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path, device)
    extra = {TS_EXTRA: ""}
    try:
        with _jit_quiet():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a TorchScript model: {exc}") from exc
    card = json.loads(extra[TS_EXTRA]) if extra[TS_EXTRA] else _sidecar(path)
    module.eval()

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return module(x)[0].numpy()

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
    card = json.loads(meta[CARD_KEY]) if CARD_KEY in meta else _sidecar(path)

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(["probabilities"], {"image": x.numpy()})[0]

    return ExportedModel(path, card, run)


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


def load_predictor(location: str | Path, device: str = "auto") -> Predictor:
    """A checkpoint, a run folder (its best.pt) or an exported ONNX/TorchScript file, ready to predict."""
    path = Path(location).expanduser()
    if path.is_file() and is_exported(path):
        return load_exported(path, device)
    if path.suffix.lower() == ".onnx":
        raise FileNotFoundError(f"checkpoint={path}: no such ONNX file")
    return load_model(path, device)
