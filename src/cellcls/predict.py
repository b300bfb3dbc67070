"""``python -m cellcls.predict checkpoint=<checkpoint, run folder or exported model> input=<image, folder or table> [output=<csv>] [cam=true]``

checkpoint= also takes a model written by ``python -m cellcls.export`` (``.onnx``, run by onnxruntime, or
``.torchscript.pt``); it gives the same classes and probabilities as the checkpoint it came from.

Prints "<file>: <class> (xx.xx%)" for each image and, for a folder (searched recursively), a table or with output=,
writes a CSV of class probabilities. A table (.csv, .tsv, .parquet) lists the images in its ``column=`` (default
path), or builds each path with ``path_template=`` (e.g. '{image_id}.jpg'), relative to the table's folder. cam=true saves a Grad-CAM overlay per image in ``<output stem>_cam/``
(``cam/`` beside the CSV, or ``./cam`` without one). Unreadable files are reported and skipped.
Other settings: device=auto|cpu|cuda, cam_layer=<layer name>, batch_size=<n>, tta=none|hflip|vflip|flips (test-time
augmentation: each image's logits averaged over its flipped copies; checkpoints only).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import as_bool, check_writable, command_args, fail, own_settings
from cellcls.data.layouts.folders import IMAGE_EXTENSIONS
from cellcls.data.layouts.table import is_table
from cellcls.deploy.predict import list_inputs, predict_files, write_csv
from cellcls.deploy.predictor import load_predictor
from cellcls.errors import ConfigError, DataError, printable, writing

SETTINGS = ("checkpoint", "input", "output", "cam", "cam_layer", "device", "batch_size", "column", "path_template",
            "tta")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "predict", required=("checkpoint", "input"))
        location = Path(own["input"]).expanduser()
        files = list_inputs(location, own.get("column", "path"), own.get("path_template"))
        if not files:
            raise DataError(f"input={location}: no image files found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        many = location.is_dir() or is_table(location)
        output = Path(own["output"]) if "output" in own else (Path("predictions.csv") if many else None)
        cam_dir = None
        if as_bool("cam", own.get("cam", "false")):
            cam_dir = output.with_name(f"{output.stem}_cam") if output else Path("cam")
        for folder in {p.parent if p is output else p for p in (output, cam_dir) if p is not None}:
            check_writable(folder)  # before the predictions, not after them
        loaded = load_predictor(own["checkpoint"], own.get("device", "auto"), own.get("tta"))
        if cam_dir is not None and not loaded.supports_cam:
            raise ConfigError(f"cam=true needs the PyTorch checkpoint (Grad-CAM takes gradients); {loaded.path} is an exported model")
        predictions, skipped = predict_files(loaded, files, int(own.get("batch_size", 64)), cam_dir, own.get("cam_layer"))
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    except ImportError as exc:
        return fail(ImportError(f'an exported ONNX model needs onnxruntime: pip install "cellcls[deploy]" ({exc})'))
    rule = loaded.card.get("ood") or {}
    if rule.get("level") and getattr(loaded, "ood", None) is None and "output" not in rule:
        print(f"note: {loaded.path.name} was exported by a cellcls whose exports did not carry the out-of-distribution "
              "rule; export it again, or predict with its checkpoint, to have images flagged", file=sys.stderr)
    for pred in predictions:
        print(pred.line(loaded.classes))
    for path, why in skipped:
        print(f"skipped {printable(path)}: {printable(why)}", file=sys.stderr)
    if output is not None:
        try:
            with writing(output):
                write_csv(output, predictions, loaded.classes)
        except OSError as exc:
            return fail(exc)
        print(f"{len(predictions)} prediction(s) written to {output}" + (f"; {len(skipped)} file(s) skipped" if skipped else ""))
    if cam_dir is not None and predictions:
        print(f"Grad-CAM overlays in {cam_dir}")
    return 0 if predictions else 1


if __name__ == "__main__":
    sys.exit(main())
