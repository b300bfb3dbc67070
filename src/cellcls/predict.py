"""``python -m cellcls.predict checkpoint=<checkpoint, run folder or exported model> input=<image or folder> [output=<csv>] [cam=true]``

checkpoint= also takes a model written by ``python -m cellcls.export`` (``.onnx``, run by onnxruntime, or
``.torchscript.pt``); it gives the same classes and probabilities as the checkpoint it came from.

Prints "<file>: <class> (xx.xx%)" for each image and, for a folder (searched recursively) or with output=,
writes a CSV of class probabilities. cam=true saves a Grad-CAM overlay per image in ``<output stem>_cam/``
(``cam/`` beside the CSV, or ``./cam`` without one). Unreadable files are reported and skipped.
Other settings: device=auto|cpu|cuda, cam_layer=<layer name>, batch_size=<n>.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cellcls import plots
from cellcls.cli import as_bool, command_args, fail, own_settings
from cellcls.data.dataset import load_image
from cellcls.data.layout import IMAGE_EXTENSIONS
from cellcls.errors import ConfigError, DataError
from cellcls.exported import Predictor, load_predictor
from cellcls.figures import cam_maps
from cellcls.inference import LoadedModel

SETTINGS = ("checkpoint", "input", "output", "cam", "cam_layer", "device", "batch_size")


@dataclass
class Prediction:
    file: Path
    probabilities: np.ndarray

    def label(self, classes: Sequence[str]) -> str:
        return classes[int(self.probabilities.argmax())]

    def line(self, classes: Sequence[str]) -> str:
        return f"{self.file}: {self.label(classes)} ({100 * self.probabilities.max():.2f}%)"


def list_inputs(location: Path) -> list[Path]:
    """The image file, or every image below the folder (sorted; other files are left alone)."""
    if location.is_file():
        return [location]
    if location.is_dir():
        return sorted(p for p in location.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    raise FileNotFoundError(f"input={location}: no such file or folder")


def predict_files(
    loaded: Predictor, files: Sequence[Path], batch_size: int = 64, cam_dir: Path | None = None, cam_layer: str | None = None
) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Probabilities for each readable file (decoded exactly as in training), and the files skipped with why."""
    prep = loaded.preprocessing
    results: list[Prediction] = []
    skipped: list[tuple[Path, str]] = []
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(load_image(path, prep["channels"], prep["image_size"]))
                chunk.append(path)
            except DataError as exc:
                skipped.append((path, str(exc.__cause__ or exc)))
        if not images:
            continue
        batch = torch.stack(images)
        probs = loaded.predict(batch)
        results += [Prediction(p, pr) for p, pr in zip(chunk, probs)]
        if cam_dir is not None:
            cam_dir.mkdir(parents=True, exist_ok=True)
            assert isinstance(loaded, LoadedModel), "Grad-CAM needs a PyTorch checkpoint"
            maps = cam_maps(loaded, batch.numpy(), cam_layer)
            for path, image, cam in zip(chunk, batch.numpy(), maps):
                Image.fromarray(plots.cam_overlay(image, cam)).save(cam_dir / f"{path.stem}_cam.png")
    return results, skipped


def write_csv(path: Path, predictions: Sequence[Prediction], classes: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "predicted", *[f"p_{c}" for c in classes]])
        for pred in predictions:
            writer.writerow([str(pred.file), pred.label(classes), *[f"{v:.6f}" for v in pred.probabilities]])


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "predict", required=("checkpoint", "input"))
        location = Path(own["input"]).expanduser()
        files = list_inputs(location)
        if not files:
            raise DataError(f"input={location}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        output = Path(own["output"]) if "output" in own else (Path("predictions.csv") if location.is_dir() else None)
        cam_dir = None
        if as_bool("cam", own.get("cam", "false")):
            cam_dir = output.with_name(f"{output.stem}_cam") if output else Path("cam")
        loaded = load_predictor(own["checkpoint"], own.get("device", "auto"))
        if cam_dir is not None and not loaded.supports_cam:
            raise ConfigError(f"cam=true needs the PyTorch checkpoint (Grad-CAM takes gradients); {loaded.path} is an exported model")
        predictions, skipped = predict_files(loaded, files, int(own.get("batch_size", 64)), cam_dir, own.get("cam_layer"))
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    for pred in predictions:
        print(pred.line(loaded.classes))
    for path, why in skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if output is not None:
        write_csv(output, predictions, loaded.classes)
        print(f"{len(predictions)} prediction(s) written to {output}" + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    if cam_dir is not None and predictions:
        print(f"Grad-CAM overlays in {cam_dir}")
    return 0 if predictions else 1


if __name__ == "__main__":
    sys.exit(main())
