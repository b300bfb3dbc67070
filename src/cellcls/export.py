"""``python -m cellcls.export checkpoint=<checkpoint or run folder> format=onnx|torchscript|web [output=<path>]``

Writes the model with its normalisation inside and its model card (classes, input recipe, metrics) embedded and
beside it as ``<output>.json``; the batch axis is dynamic. Default output: ``<run>/export/model.onnx`` or
``<run>/export/model.torchscript.pt``. Other settings: opset=<ONNX opset, default 18>, check=true|false (run the
exported model on random inputs and compare it with PyTorch, default true).

``format=web`` writes a folder (default ``<run>/export/web/``) that classifies images inside the browser: open it
from any static file server (``python -m http.server -d <folder>``). Its runtime, npm's onnxruntime-web, comes
from runtime=<the .tgz of npm pack, or a node_modules/onnxruntime-web folder>, else cellcls's cache, else is
downloaded once from the npm registry.

``quantize=int8`` (format=onnx or web) writes a statically quantised model (default ``<run>/export/model.int8.onnx``)
after scoring it beside the fp32 export on the test split: accuracy, ROC-AUC, file size and CPU latency at batch
1 and 32 are printed and stored in its card; an accuracy drop over max_drop=<0.01> refuses it, with the numbers.
calibration=<200> training images calibrate the activation ranges.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import as_bool, command_args, fail, own_settings, whole_number
from cellcls.deploy.export import FORMATS, default_output, export_model, max_difference
from cellcls.deploy.quantize import DEFAULT_MAX_DROP, check_max_drop, export_int8
from cellcls.deploy.web_export import MODEL_FILE, export_web
from cellcls.errors import ConfigError, writing
from cellcls.models.trained import load_model

SETTINGS = ("checkpoint", "format", "output", "opset", "check", "runtime", "quantize", "calibration", "max_drop")
ALL_FORMATS = (*FORMATS, "web")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "export", required=("checkpoint", "format"))
        fmt = own["format"].lower()
        if fmt not in ALL_FORMATS:
            raise ConfigError(f"format={own['format']!r} is not valid; allowed values: {', '.join(ALL_FORMATS)}")
        if "runtime" in own and fmt != "web":
            raise ConfigError("runtime= is the browser runtime of format=web only")
        quantize = own.get("quantize", "none").lower()
        if quantize not in ("none", "int8"):
            raise ConfigError(f"quantize={own['quantize']!r} is not valid; allowed values: none, int8")
        if quantize == "int8" and fmt == "torchscript":
            raise ConfigError("quantize=int8 is for format=onnx or web (onnxruntime's quantisation)")
        if quantize == "none" and ("calibration" in own or "max_drop" in own):
            raise ConfigError("calibration= and max_drop= belong to quantize=int8")
        int8 = dict(calibration=whole_number("calibration", own.get("calibration", 200), 1),
                    max_drop=check_max_drop(own.get("max_drop", DEFAULT_MAX_DROP)))
        loaded = load_model(own["checkpoint"], device="cpu")
        opset = int(own.get("opset", 18))
        if "output" in own:
            output = Path(own["output"]).expanduser()
        else:
            output = default_output(loaded, fmt)
            output = output.with_name("model.int8.onnx") if quantize == "int8" and fmt == "onnx" else output
        report = None
        with writing(output):
            if quantize == "int8":
                path, report = export_int8(loaded, fmt, output, opset, own.get("runtime"), **int8)
            elif fmt == "web":
                path = export_web(loaded, output, own.get("runtime"), opset=opset) / MODEL_FILE
            else:
                path = export_model(loaded, fmt, output, opset=opset)
        # random pixels say nothing of an int8 model (calibrated on real images): its check is the test-split report
        diff = max_difference(loaded, path) if report is None and as_bool("check", own.get("check", "true")) else None
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    except ImportError as exc:
        return fail(ImportError(f'format=onnx needs onnx, onnxscript and onnxruntime: pip install "cellcls[deploy]" ({exc})'))
    for line in report.lines() if report is not None else []:
        print(line)
    if fmt == "web":
        print(f"exported {loaded.card['model']} ({', '.join(loaded.classes)}) for the browser to {path.parent}/; "
              f"open it with: python -m http.server -d {path.parent} (then http://localhost:8000/)")
    else:
        print(f"exported {loaded.card['model']} ({', '.join(loaded.classes)}) to {path}; model card {path.name}.json")
    if diff is not None:
        print(f"check: largest probability difference from PyTorch on random inputs {diff:.2e}")
        if not diff <= 1e-4:  # a NaN difference is a failure too
            print("cellcls: error: the exported model disagrees with the checkpoint by more than 1e-4 (or gives "
                  "non-finite probabilities)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
