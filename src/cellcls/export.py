"""``python -m cellcls.export checkpoint=<checkpoint or run folder> format=onnx|torchscript [output=<file>]``

Writes the model with its normalisation inside and its model card (classes, input recipe, metrics) embedded and
beside it as ``<output>.json``; the batch axis is dynamic. Default output: ``<run>/export/model.onnx`` or
``<run>/export/model.torchscript.pt``. Other settings: opset=<ONNX opset, default 18>, check=true|false (run the
exported model on random inputs and compare it with PyTorch, default true).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import as_bool, command_args, fail, own_settings
from cellcls.deploy.export import FORMATS, default_output, export_model, max_difference
from cellcls.errors import ConfigError, writing
from cellcls.models.trained import load_model

SETTINGS = ("checkpoint", "format", "output", "opset", "check")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "export", required=("checkpoint", "format"))
        fmt = own["format"].lower()
        if fmt not in FORMATS:
            raise ConfigError(f"format={own['format']!r} is not valid; allowed values: {', '.join(FORMATS)}")
        loaded = load_model(own["checkpoint"], device="cpu")
        output = Path(own["output"]).expanduser() if "output" in own else default_output(loaded, fmt)
        with writing(output):
            path = export_model(loaded, fmt, output, opset=int(own.get("opset", 18)))
        diff = max_difference(loaded, path) if as_bool("check", own.get("check", "true")) else None
    except (ConfigError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    except ImportError as exc:
        return fail(ImportError(f'format=onnx needs onnx, onnxscript and onnxruntime: pip install "cellcls[deploy]" ({exc})'))
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
