"""Prediction-set coverage under grouped cross-validation, from a cross-validated run's out-of-fold predictions.

    python scripts/conformal_cv.py run=<run trained with cv.folds=K> [levels=0.8,0.9,0.95]

For each fold k the set threshold is fitted on the out-of-fold probabilities of the other folds' images and applied
to fold k's, whose patients none of those images share (the folds are grouped):
``cellcls.scoring.conformal.cross_fold_sets``, what ``cv.folds=K conformal=<level>`` reports for its one level.
Prints one markdown row per level: coverage per fold, pooled coverage, mean set size and the share of single-class
sets.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from cellcls.scoring.conformal import cross_fold_sets, set_summary


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    run = Path(args["run"]).expanduser()
    with open(run / "cv_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    y = np.array([classes.index(r["true"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    folds = np.array([int(r["fold"]) for r in rows])
    print(f"{run}: {len(rows)} images, {len(set(folds))} folds")
    print("| level | coverage per fold | pooled coverage | mean set size | single-class sets |")
    print("|---|---|---|---|---|")
    for level in (float(v) for v in args.get("levels", "0.8,0.9,0.95").split(",")):
        members = cross_fold_sets(probs, y, folds, level)
        per_fold = [set_summary(members[folds == k], y[folds == k])["coverage"] for k in sorted(set(folds))]
        pooled = set_summary(members, y)
        print(f"| {level:g} | {', '.join(f'{c:.3f}' for c in per_fold)} | {pooled['coverage']:.3f} | "
              f"{pooled['mean_size']:.2f} | {100 * pooled['singletons']:.0f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
