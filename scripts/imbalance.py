"""Class weights against balanced sampling on an imbalanced real training set (docs/QUALITY.md, "Imbalanced
classes: weights or a balanced sampler").

    python scripts/imbalance.py [root=../shared/data/malaria] [rare=0.1] [seeds=0,1,2] [epochs=20] [work=/tmp/imbalance]
        [overrides...]

The malaria subset's patients are split in two (seeded): the training patients keep all their Uninfected cells and
only enough Parasitized ones for ``rare`` of the training folder to be Parasitized; the other patients' cells, as
they are, are the test folder (scored with ``python -m cellcls.evaluate data=<it>``). Each seed trains the S1 recipe (LeNet, dataset=malaria settings) three ways: neither,
``class_weights=balanced``, ``dataset.sampler=balanced``; the table gives test balanced accuracy, ROC-AUC and
sensitivity (the rare class's recall), mean and range over seeds.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

import cellcls
from cellcls.evaluate import main as evaluate_main

ARMS = {"neither": ["class_weights=none"], "class weights": ["class_weights=balanced"],
        "balanced sampler": ["class_weights=none", "dataset.sampler=balanced"]}


def build(root: Path, work: Path, rare: float, seed: int = 0) -> Path:
    """The imbalanced train folder and the untouched test folder, split by patient (the file name's C<n>)."""
    cells = next(p for p in [root / "cell_images", root] if (p / "Parasitized").is_dir())
    files = {c: sorted((cells / c).glob("*.png")) for c in ("Uninfected", "Parasitized")}
    patients = sorted({re.match(r"^(C\d+)", f.name).group(1) for fs in files.values() for f in fs})
    rng = np.random.default_rng(seed)
    test_patients = set(rng.choice(patients, len(patients) // 3, replace=False))
    out = work / f"data_rare{rare:g}"
    shutil.rmtree(out, ignore_errors=True)
    for split in ("cell_images", "test"):  # the malaria layout (flat class folders) for training
        keep = {c: [f for f in fs if (re.match(r"^(C\d+)", f.name).group(1) in test_patients) == (split == "test")]
                for c, fs in files.items()}
        if split == "cell_images":
            n_rare = round(len(keep["Uninfected"]) * rare / (1 - rare))
            keep["Parasitized"] = list(rng.choice(keep["Parasitized"], n_rare, replace=False))
        for c, fs in keep.items():
            (out / split / c).mkdir(parents=True)
            for f in fs:
                (out / split / c / f.name).symlink_to(f.resolve())
        print(f"{split}: " + ", ".join(f"{len(fs)} {c}" for c, fs in keep.items()), flush=True)
    return out


def main(argv: list[str]) -> int:
    own = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("root", "rare", "seeds", "epochs", "work"))
    extra = [a for a in argv if a.split("=", 1)[0] not in own]
    root = Path(own.get("root", Path(__file__).resolve().parents[2] / "shared" / "data" / "malaria"))
    rare, epochs = float(own.get("rare", 0.1)), int(own.get("epochs", 20))
    seeds = [int(s) for s in own.get("seeds", "0,1,2").split(",")]
    work = Path(own.get("work", "/tmp/imbalance"))
    data = build(root, work, rare)
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm, settings in ARMS.items():
            run = work / f"{arm.replace(' ', '_')}_seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            cellcls.train(["experiment=s1_malaria_lenet", f"dataset.root={data}", "dataset.test_fraction=0",
                           f"seed={seed}", f"trainer.max_epochs={epochs}", "trainer.progress_bar=false", *settings, *extra],
                          run_dir=run)
            assert evaluate_main([f"checkpoint={run}", f"data={data / 'test'}", "device=cpu"]) == 0
            test = json.loads((run / "eval" / "test" / "metrics.json").read_text())
            row = {k: float(test[k]["value"]) for k in ("balanced_accuracy", "roc_auc", "sensitivity", "accuracy")}
            results[arm].append(row)
            print(f"seed {seed} {arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    print(f"\n| arm | balanced accuracy | ROC-AUC | sensitivity (Parasitized) | accuracy |  ({len(seeds)} seeds, rare={rare:g})")
    print("|---|---|---|---|---|")
    for arm, rows in results.items():
        cells = []
        for k in ("balanced_accuracy", "roc_auc", "sensitivity", "accuracy"):
            v = np.array([r[k] for r in rows])
            cells.append(f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})")
        print(f"| {arm} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
