"""``python -m cellcls.probe [flips=none|hflip|vflip|flips] [folds=5] [knn=true] [output=<dir>] [training overrides]``

A frozen-feature baseline, what practitioners run first: a pretrained backbone's embeddings of every image (cached
by weights checksum, preprocessing and file), a logistic regression and a k-NN fitted on the training split's, their
regularisation and k chosen by grouped cross-validation there (patients or near-duplicate clusters stay in one fold).
The backbone defaults to the installed EfficientNet-Lite0 (``model=timm model.arch=tf_efficientnet_lite0
model.pretrained=true``; any pretrained ``model=timm`` works). Every other ``key=value`` is a training override, as
for ``python -m cellcls.train`` (``dataset=skin_cancer dataset.root=<dir>``, ``dataset.image_size=[224,224]``).

The result is an ordinary run folder (default ``outputs/<date>/<time>_<dataset>_probe``): ``checkpoints/best.pt``
is the backbone with the regression as its classifier layer, which ``python -m cellcls.evaluate``, ``predict``,
``export`` and ``serve`` take like any trained model; ``test_metrics.json`` its test scores; ``eval/knn_test/`` the
k-NN's metrics with 95% intervals; ``result.json`` the choices (C, k, CV log-losses) and timings.
``flips=hflip`` averages each embedding over the image and its mirror (``flips``: both flips and the 180-degree turn);
the saved model then averages the same views (``model.tta``). Other settings: device=auto|cpu|cuda, batch_size=<64>.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cellcls.cli import as_bool, command_args, fail, split_own, whole_number
from cellcls.errors import ConfigError, DataError

OWN = ("flips", "folds", "knn", "output", "device", "batch_size")
BACKBONE = ("model=timm", "model.arch=tf_efficientnet_lite0", "model.pretrained=true")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    own, overrides = split_own(args, OWN)
    from cellcls.config import check_command_line, compose_config
    from cellcls.training.validate import validate
    from cellcls.training.probe import ProbeSettings, probe

    try:
        given = {o.split("=", 1)[0] for o in overrides}
        if "model" in given:  # another backbone: the user names it whole
            defaults: list[str] = []
        else:
            defaults = [b for b in BACKBONE if b.split("=", 1)[0] not in given]
        overrides = [*defaults, *overrides]
        check_command_line(overrides)
        cfg = compose_config(overrides)
        validate(cfg)
        settings = ProbeSettings(own.get("flips", "none"), whole_number("folds", own.get("folds", "5"), 2),
                                 as_bool("knn", own.get("knn", "true")), own.get("device", "auto"),
                                 whole_number("batch_size", own.get("batch_size", "64"), 1))
        run = Path(own.get("output") or f"outputs/{datetime.now():%Y-%m-%d/%H-%M-%S}_{cfg.dataset.name}_probe")
        from cellcls.infra.run_folder import RunFolder
        from cellcls.infra.run_lock import run_folder_lock

        with run_folder_lock(run):  # one writer per run folder, as for training
            _log_to(RunFolder(run).probe_log)
            summary = probe(cfg, run, settings)
    except (ConfigError, DataError, OSError, ValueError) as exc:
        return fail(exc)
    print(_lines(summary, run))
    return 0


def _lines(summary: dict, run: Path) -> str:
    out = [f"probe of {summary['arch']} ({summary['starting_weights']['name']}), flips {summary['flips']}: "
           f"embeddings {summary['embed_seconds']} s, fits {summary['fit_seconds']} s"]
    for name, scores in (("linear", summary.get("test")), ("k-NN", (summary.get("knn") or {}).get("test"))):
        if scores:
            auc = scores.get("roc_auc")
            out.append(f"  {name:<7} test accuracy {scores['accuracy']:.4f}  balanced {scores['balanced_accuracy']:.4f}"
                       + (f"  ROC-AUC {auc:.4f}" if auc is not None else ""))
    out += [f"run folder: {run}", f"  python -m cellcls.evaluate checkpoint={run}   # intervals, figures, Grad-CAM",
            f"  python -m cellcls.export checkpoint={run} format=onnx"]
    return "\n".join(out)


def _log_to(path: Path) -> None:
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        root.addHandler(console)
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(fmt)
    root.addHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
