"""The label review of a cross-validated run: ``label_errors/label_errors.csv`` (every image, most doubtful first)
and ``label_errors/label_errors.png`` (the top of the list as thumbnails), from its ``cv_predictions.csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cellcls.data.dataset import load_image
from cellcls.errors import ConfigError, DataError
from cellcls.infra import plots
from cellcls.infra.run_folder import RunFolder, write_csv
from cellcls.scoring.label_errors import LabelReview, review_labels

GRID = 16


def read_out_of_fold(run: RunFolder) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of a run's ``cv_predictions.csv`` and its classes, in column order."""
    if not run.cv_predictions.is_file():
        raise ConfigError(f"{run.root} has no {run.cv_predictions.name}: the review needs out-of-fold predictions; "
                          "train with cv.folds=5 (or another number of folds) first")
    with open(run.cv_predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"{run.cv_predictions} lists no images")
    return rows, [c[2:] for c in rows[0] if c.startswith("p_")]


def review_run(location: str | Path, grid: int = GRID) -> tuple[LabelReview, Path]:
    """Rank the run's images by how much the models that did not train on them doubt their label; write the CSV
    and the thumbnail grid; returns the review and the folder."""
    run = RunFolder(Path(location).expanduser())
    rows, classes = read_out_of_fold(run)
    labels = np.array([classes.index(r["true"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    review = review_labels(labels, probs)
    out = run.label_errors
    ranked = [{"rank": rank + 1, "file": rows[i]["file"], "given": rows[i]["true"],
               "suggested": classes[review.suggested[i]], "p_given": f"{probs[i, labels[i]]:.6f}",
               "p_suggested": f"{probs[i, review.suggested[i]]:.6f}", "likely_error": str(bool(review.issue[i])).lower(),
               "fold": rows[i]["fold"]} for rank, i in enumerate(review.order)]
    write_csv(out / "label_errors.csv", ranked, columns=tuple(ranked[0]))
    draw_grid(run, ranked[:grid], out / "label_errors.png")
    return review, out


def draw_grid(run: RunFolder, ranked: list[dict[str, Any]], path: Path) -> None:
    """Thumbnails of the most doubtful images, titled with their given and suggested labels."""
    # a cross-validated run's folds hold the resolved config (the data root)
    found = next((f for f in (run.config, run.fold(1).config) if f.is_file()), None)
    config = yaml.safe_load(found.read_text()) if found is not None else {}
    root = Path(str((config.get("dataset") or {}).get("root") or run.root)).resolve()
    images, titles = [], []
    for row in ranked:
        image = (root / row["file"]).resolve()
        if not image.is_relative_to(root):  # an edited CSV naming a file outside the data set is not opened
            continue
        try:
            images.append(load_image(image, 3, (96, 96)).numpy())
        except (DataError, OSError):
            continue  # a file moved since training: listed in the CSV, not drawn
        titles.append(f"{Path(row['file']).name[:28]}\ngiven {row['given']}, models say {row['suggested']} "
                      f"({100 * float(row['p_suggested']):.0f}%)")
    if images:
        plots.save(plots.image_grid(images, titles, columns=4, colors=[plots.WRONG] * len(images),
                                    suptitle="Likely label errors: the images whose given label the out-of-fold "
                                             "models doubt most"), path)
