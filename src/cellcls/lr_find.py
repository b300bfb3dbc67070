"""``python -m cellcls.lr_find [steps=200] [start_lr=1e-7] [end_lr=10] [output=<dir>] [training overrides]``

The learning-rate range test (fastai's ``lr_find``): builds the model, data and optimiser exactly as
``python -m cellcls.train <training overrides>`` would, trains ``steps`` batches while the learning rate grows
exponentially from ``start_lr`` to ``end_lr`` (stopping early when the loss diverges), and writes
``<output>/lr_find.png`` (the smoothed loss against the rate, the suggestion marked) and ``lr_find.csv``. Prints the
suggested rate (where the loss falls fastest) and the override to train with. Nothing is left that looks like a run:
no checkpoint, no run folder (default output: ``outputs/lr_find/<date>_<time>/``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import command_args, fail, log_like_training, split_own, whole_number
from cellcls.errors import ConfigError, DataError

OWN = ("steps", "start_lr", "end_lr", "output")


def _rate(name: str, value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number (a learning rate, e.g. 1e-7)") from None
    if not rate > 0:
        raise ConfigError(f"{name}={value}: a learning rate must be above 0")
    return rate


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    own, overrides = split_own(args, OWN)
    log_like_training()
    from cellcls.config import check_command_line, compose_config
    from cellcls.infra import plots
    from cellcls.infra.run_folder import write_csv
    from cellcls.training.build import build_job
    from cellcls.training.lr_find import range_test, range_test_figure
    from cellcls.training.validate import validate

    try:
        steps = whole_number("steps", own.get("steps", 200), 20)
        start, end = _rate("start_lr", own.get("start_lr", "1e-7")), _rate("end_lr", own.get("end_lr", "10"))
        if start >= end:
            raise ConfigError(f"start_lr={start:g} must be below end_lr={end:g}")
        check_command_line(overrides)
        cfg = compose_config(overrides)
        if int(cfg.cv.folds) >= 2:
            raise ConfigError("lr_find runs on the training split once; drop cv.folds (the folds train alike)")
        validate(cfg)
        output = Path(own.get("output", Path("outputs") / "lr_find" / time.strftime("%Y-%m-%d_%H-%M-%S")))
        with tempfile.TemporaryDirectory(prefix="cellcls-lr-find-") as scratch:
            result = range_test(build_job(cfg, Path(scratch) / "run"), start, end, steps)
        output.mkdir(parents=True, exist_ok=True)
        write_csv(output / "lr_find.csv", result.rows(), columns=("step", "lr", "loss", "smoothed"))
        plots.save(range_test_figure(result), output / "lr_find.png")
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    print(f"range test: {len(result.lrs)} steps from lr {start:g}; stopped after {result.stopped}")
    if result.suggestion is None:
        print(f"no suggestion: {result.rule} (try a lower start_lr or more steps)")
    else:
        print(f"suggested learning rate {result.suggestion:.3g} ({result.rule}; the lowest loss at "
              f"{result.minimum:.3g})")
        print("train with: python -m cellcls.train " + " ".join([*overrides, f"optim.lr={result.suggestion:.2g}"]))
    print(f"written to {output}: lr_find.png, lr_find.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
