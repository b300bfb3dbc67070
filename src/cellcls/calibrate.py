"""``python -m cellcls.calibrate checkpoint=<checkpoint or run folder> [calibrate=true] [operating_point=<kind>:<level>] [conformal=<level>] [ood=<level>]``

Fits a trained model's trust rules on its own splits (rebuilt from the checkpoint alone) and stores them in the
checkpoint, as training with the same settings does. On the validation split: temperature scaling (calibrate=true), a
two-class decision threshold (operating_point=sensitivity:0.95 or specificity:<level>) and conformal prediction sets
(conformal=0.95: each image gets the set of classes that holds its true class 95% of the time; every class in it
means "cannot tell"). On the training split, thresholded on validation: the out-of-distribution rule (ood=0.95: an
image further from every training class than 95% of the validation images is flagged "outside what this model was
trained on"). evaluate, predict, serve and the Python API use the stored rules (exports carry the decision rule, not
the out-of-distribution one). A rule stored earlier is replaced. Other settings: device=auto|cpu|cuda.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import as_bool, command_args, fail, own_settings
from cellcls.deploy.runtimes import is_exported
from cellcls.errors import ConfigError, DataError
from cellcls.evaluation.recalibrate import recalibrate
from cellcls.scoring.calibration import parse_operating_point
from cellcls.scoring.conformal import check_level
from cellcls.scoring.ood import check_ood_level

SETTINGS = ("checkpoint", "calibrate", "operating_point", "conformal", "ood", "device")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "calibrate", required=("checkpoint",))
        if is_exported(Path(own["checkpoint"]).expanduser()):
            raise ConfigError(f"checkpoint={own['checkpoint']} is an exported model; calibrate refits a PyTorch "
                              "checkpoint: give the run folder it was exported from, then export it again")
        point = own.get("operating_point")
        if point:
            parse_operating_point(point)
        level = check_level(own["conformal"]) if "conformal" in own else None
        ood = check_ood_level(own["ood"]) if "ood" in own else None
        decision, rule = recalibrate(own["checkpoint"], as_bool("calibrate", own.get("calibrate", "false")),
                                     point or None, level, own.get("device", "auto"), ood)
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    if decision is not None:
        print(f"fitted on {decision.fitted_on}: temperature {decision.temperature:.4f}"
              + (f", threshold {decision.threshold:.4f} ({decision.operating_point})"
                 if decision.threshold is not None else "")
              + (f", {decision.set_method} prediction sets for coverage {decision.set_level:g} (score threshold "
                 f"{decision.set_threshold:.4f})" if decision.has_sets else ""))
    if rule is not None:
        print(f"out-of-distribution rule fitted on {rule.fitted_on}: a squared Mahalanobis distance of the "
              f"activation statistics above {rule.threshold:.1f} (the validation {rule.level:g} quantile) is flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
