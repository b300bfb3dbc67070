"""Multi-label training measured on real and procedural images (docs/QUALITY.md, "Multi-label findings").

    python scripts/multilabel.py [set=xray|synthetic] [root=../shared/data/pneumonia] [seeds=0,1,2] [epochs=20]
        [work=/tmp/multilabel] [overrides...]

``set=xray``: the shared pneumonia X-rays as a ChestX-ray14-format table (``Finding Labels`` = ``Pneumonia|Bacterial``
or ``Pneumonia|Viral`` from the Kermany file names, ``No Finding`` for NORMAL; ``Patient ID`` from the file name;
the download's own train/val/test folders as the split column), trained with the X-ray CNN at 128 px.
``set=synthetic``: ``dataset=synthetic_multilabel`` (ring, stippling, target marks) at 64 px with LeNet, 300
training cells. Prints each finding's test ROC-AUC and AP, mean and range over seeds, and the training time.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from cellcls.config import compose_config
from cellcls.training.run import train

XRAY = ["dataset=csv", "dataset.table.path=Image Index", "dataset.table.label=Finding Labels",
        "dataset.table.group=Patient ID", "dataset.table.split=split", "dataset.table.label_sep=|",
        "dataset.channels=1", "dataset.image_size=[128,128]", "model=xray_cnn"]
SYNTHETIC = ["dataset=synthetic_multilabel", "dataset.render.train_per_class=150", "dataset.render.test_per_class=50",
             "dataset.render.size=64", "dataset.image_size=[64,64]", "model=lenet"]


def chestxray14_table(root: Path, out: Path) -> Path:
    """The Kermany pneumonia download as a ChestX-ray14-format table (see the module docstring)."""
    rows = []
    for file in sorted((root / "chest_xray").rglob("*.jpeg")):
        findings = ("No Finding" if file.parent.name == "NORMAL" else
                    "Pneumonia|Bacterial" if "bacteria" in file.name else "Pneumonia|Viral")
        patient = re.match(r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)", file.name)
        rows.append({"Image Index": file.relative_to(root).as_posix(), "Finding Labels": findings,
                     "Patient ID": patient.group(1) if patient else file.stem, "split": file.parent.parent.name})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("set", "root", "seeds", "epochs", "work"))
    extra = [a for a in argv if a.split("=", 1)[0] not in opts]
    which, work = opts.get("set", "xray"), Path(opts.get("work", "/tmp/multilabel"))
    if which == "xray":
        root = Path(opts.get("root", "../shared/data/pneumonia")).resolve()
        table = chestxray14_table(root, work / "cxr14.csv")
        base = [*XRAY, f"dataset.root={root}", f"dataset.table.file={table}"]
    else:
        base = list(SYNTHETIC)
    per: dict[str, list[tuple[float, float]]] = {}
    took = []
    for seed in [int(s) for s in opts.get("seeds", "0,1,2").split(",")]:
        overrides = [*base, f"trainer.max_epochs={opts.get('epochs', '20')}", f"seed={seed}",
                     "trainer.progress_bar=false", *extra]
        start = time.time()
        result = train(compose_config(overrides), work / f"{which}_seed{seed}", overrides)["test"]
        took.append(time.time() - start)
        for finding, m in result["findings"].items():
            per.setdefault(finding, []).append((m["roc_auc"]["value"], m["average_precision"]["value"]))
        print(json.dumps({"seed": seed, "macro_roc_auc": result["macro_roc_auc"],
                          **{f: round(m["roc_auc"]["value"], 3) for f, m in result["findings"].items()}}))
    print(f"| finding | ROC-AUC mean (range) | AP mean (range) |  ({which}, {len(took)} seeds, "
          f"{np.mean(took):.0f} s a run)")
    for finding, values in per.items():
        auc, ap = np.array(values).T
        print(f"| {finding} | {auc.mean():.3f} ({auc.min():.3f}-{auc.max():.3f}) | "
              f"{ap.mean():.3f} ({ap.min():.3f}-{ap.max():.3f}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
