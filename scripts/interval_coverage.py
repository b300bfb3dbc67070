"""Do the 95% intervals cellcls reports cover the truth? A simulation on out-of-fold predictions.

    python scripts/interval_coverage.py predictions=<run>/cv_predictions.csv [groups=../shared/data/MANIFEST.csv]
        [sizes=5,10,20] [draws=300] [interval=grouped|bootstrap] [bootstrap=500] [seed=0]

``cv_predictions.csv`` (from ``cv.folds=K``) scores every image by a model that did not train on it. Each draw takes
a random test set of ``size`` groups (patients, or the original smear photos, from the manifest's ``group`` column),
computes the intervals exactly as ``evaluate`` does (``cellcls.scoring.metrics.evaluate_predictions`` with the
groups; ``interval=bootstrap`` for the percentile bootstrap cellcls reported before), and counts whether each metric's interval holds its value on all the *other* groups (the truth this small
test set stands for). Prints one markdown row per size and metric: the empirical coverage of the nominal 95%
interval (with its own Monte-Carlo standard error), the mean width, and how often the interval missed low/high.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cellcls.scoring.metrics import evaluate_predictions, headline_metrics
from cellcls.scoring.heads import labels_of


def parse(argv: list[str]) -> dict[str, str]:
    own = {"groups": "../shared/data/MANIFEST.csv", "sizes": "5,10,20", "draws": "300", "bootstrap": "500", "seed": "0",
           "interval": "grouped"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in (*own, "predictions"):
            sys.exit(f"unknown argument {arg!r}")
        own[key] = value
    if "predictions" not in own:
        sys.exit("predictions=<cv_predictions.csv> is required")
    return own


def load(predictions: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    by_file = {}
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            by_file[row["file"]] = row["group"]
    with open(predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    y = np.array([classes.index(r["true"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    groups = []
    for r in rows:
        matches = [g for f, g in by_file.items() if f.endswith(r["file"]) or r["file"].endswith(f)]
        groups.append(matches[0] if matches else f"file:{r['file']}")
    return y, probs, np.array(groups), classes


def main(argv: list[str]) -> None:
    own = parse(argv)
    y, probs, groups, classes = load(Path(own["predictions"]), Path(own["groups"]))
    rng = np.random.default_rng(int(own["seed"]))
    names = np.unique(groups)
    metrics = headline_metrics(len(classes))
    print(f"{len(y)} images, {len(names)} groups, classes {classes}")
    print("| groups in the test set | metric | coverage of the 95% interval (MC s.e.) | mean width | truth below / above it |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in own["sizes"].split(",")):
        hits: dict[str, list[int]] = defaultdict(list)
        widths: dict[str, list[float]] = defaultdict(list)
        low: dict[str, int] = defaultdict(int)
        high: dict[str, int] = defaultdict(int)
        for draw in range(int(own["draws"])):
            chosen = rng.choice(names, size, replace=False)
            test = np.isin(groups, chosen)
            rest = ~test
            result = evaluate_predictions(y[test], probs[test], classes, n_boot=int(own["bootstrap"]), seed=draw,
                                          groups=list(groups[test]), interval=own["interval"])
            for name, metric in metrics.items():
                truth = metric(y[rest], labels_of(probs[rest]), probs[rest])
                if name not in result or math.isnan(truth) or any(math.isnan(v) for v in result[name]["ci95"]):
                    continue
                lo, hi = result[name]["ci95"]
                hits[name].append(int(lo <= truth <= hi))
                widths[name].append(hi - lo)
                low[name] += int(truth < lo)
                high[name] += int(truth > hi)
        for name in metrics:
            if not hits[name]:
                continue
            cov, n = float(np.mean(hits[name])), len(hits[name])
            print(f"| {size} | {name} | {cov:.3f} ({math.sqrt(cov * (1 - cov) / n):.3f}, {n} draws) | "
                  f"{np.mean(widths[name]):.3f} | {low[name]} / {high[name]} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
