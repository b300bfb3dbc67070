"""How far a trained model's per-image trust signals can be trusted, measured on the shared real subsets.

    python scripts/trust.py runs=<run folder>[,<run folder>...] [levels=0.8,0.9,0.95] [ood=0.95]
        [data=../shared/data] [device=cpu] [foreign=200]

Prediction sets: for each run and level, the sets are refitted on the run's own validation split (what
``python -m cellcls.calibrate checkpoint=<run> conformal=<level>`` does; it replaces the run's stored set rule) and the
test split is evaluated (``evaluate``, written to ``<run>/eval/test_sets-<level>``). One markdown row per run and
level: coverage with its grouped 95% interval, mean set size, single-class share, the lowest per-class coverage.

Out-of-distribution flags: the rule is fitted at ``ood=`` (``calibrate ... ood=<level>``); then one row per run and
foreign data set (the other shared subsets, ``foreign`` images of each, sorted by name): the share of its own test
split flagged, the share of the foreign images flagged, and the AUROC of the score separating the two.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cellcls.data.dataset import load_image
from cellcls.data.layouts.folders import IMAGE_EXTENSIONS
from cellcls.evaluation.evaluate import evaluate, load_data
from cellcls.evaluation.recalibrate import recalibrate
from cellcls.models.trained import LoadedModel, load_model
from cellcls.scoring.ood import activation_statistics, collect_statistics

DATASETS = ("malaria", "pneumonia", "skin_cancer", "blood_cells")


def parse(argv: list[str]) -> dict[str, str]:
    own = {"levels": "0.8,0.9,0.95", "ood": "0.95", "data": "../shared/data", "device": "cpu", "foreign": "200"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in (*own, "runs"):
            sys.exit(f"unknown argument {arg!r}; expected runs=, {'=, '.join(own)}=")
        own[key] = value
    if "runs" not in own:
        sys.exit("runs=<run folder>[,<run folder>...] is required")
    return own


def set_row(run: Path, level: float, device: str) -> str:
    decision, _ = recalibrate(run, conformal=level, device=device)
    assert decision is not None
    result, _ = evaluate(run, make_plots=False, device=device, output=run / "eval" / f"test_sets-{level:g}")
    sets = result["prediction_sets"]
    lo, hi = sets["coverage"]["ci95"]
    groups = result["interval"].get("groups")
    worst = min(r["coverage"] for r in sets["per_class"].values())
    return (f"| {result_name(run)} | {level:g} | {decision.fitted_on} | {result['num_images']}"
            + (f" ({groups} groups)" if groups else "") + f" | {sets['coverage']['value']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{sets['mean_size']:.2f} | {100 * sets['singletons']:.0f}% | {worst:.3f} | {result['accuracy']['value']:.3f} |")


def result_name(run: Path) -> str:
    return str(load_model(run, "cpu").config.dataset.name)


def file_scores(loaded: LoadedModel, files: list[Path]) -> np.ndarray:
    prep = loaded.preprocessing
    out = []
    for start in range(0, len(files), 64):
        batch = torch.stack([load_image(f, prep.channels, prep.image_size, window=prep.window)
                             for f in files[start:start + 64]])
        features, _ = activation_statistics(loaded.model, loaded.prepare(batch))
        out.append(loaded.ood.score(features))
    return np.concatenate(out)


def ood_rows(run: Path, level: float, data: Path, device: str, foreign: int) -> list[str]:
    recalibrate(run, ood=level, device=device)
    loaded = load_model(run, device)
    assert loaded.ood is not None
    own_features = collect_statistics(loaded.model, load_data(loaded, "test", None).loader, loaded.device)
    own = loaded.ood.score(own_features)
    rows = []
    name = str(loaded.config.dataset.name)
    for other in DATASETS:
        if other == name or not (data / other).is_dir():
            continue
        files = sorted(p for p in (data / other).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:foreign]
        theirs = file_scores(loaded, files)
        auroc = roc_auc_score(np.r_[np.zeros(len(own)), np.ones(len(theirs))], np.r_[own, theirs])
        rows.append(f"| {name} | {other} | {100 * np.mean(own > loaded.ood.threshold):.1f}% of {len(own)} | "
                    f"{100 * np.mean(theirs > loaded.ood.threshold):.1f}% of {len(theirs)} | {auroc:.3f} |")
    return rows


def main(argv: list[str]) -> None:
    own = parse(argv)
    runs = [Path(r).expanduser() for r in own["runs"].split(",")]
    print("| data set | level | fitted on | test images | coverage [95% CI] | mean set size | single-class sets | "
          "lowest class coverage | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for level in own["levels"].split(","):
            print(set_row(run, float(level), own["device"]), flush=True)
    print()
    print(f"| model of | shown | own test flagged | shown flagged | AUROC |  (ood={own['ood']})")
    print("|---|---|---|---|---|")
    for run in runs:
        for row in ood_rows(run, float(own["ood"]), Path(own["data"]).expanduser(), own["device"], int(own["foreign"])):
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
