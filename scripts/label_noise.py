"""Label errors on purpose, and how many of them ``python -m cellcls.label_errors`` finds.

    python scripts/label_noise.py flip data=../shared/data/malaria output=/tmp/flip [share=0.05] [seed=0]
    python -m cellcls.train experiment=s1_malaria_lenet dataset.root=/tmp/flip/malaria cv.folds=5 hydra.run.dir=/tmp/flip/cv
    python -m cellcls.label_errors run=/tmp/flip/cv
    python scripts/label_noise.py score run=/tmp/flip/cv flipped=/tmp/flip/flipped.txt

``flip`` copies a class-folder data set and moves a seeded ``share`` of its images into another class's folder
(listing them, relative to the copy's root, in ``flipped.txt``); ``score`` prints the precision and recall of the
flipped files among the top 5%, 10% and 20% of the review's ranking and among the images it flags.
"""

from __future__ import annotations

import csv
import random
import shutil
import sys
from pathlib import Path

IMAGES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def flip(data: Path, output: Path, share: float, seed: int) -> None:
    copy = output / data.name
    shutil.copytree(data, copy)
    files = sorted(p for p in copy.rglob("*") if p.suffix.lower() in IMAGES)
    classes = sorted({p.parent for p in files})
    rng = random.Random(seed)
    chosen = rng.sample(files, round(share * len(files)))
    lines = []
    for path in chosen:
        target = rng.choice([c for c in classes if c != path.parent]) / path.name
        path.chmod(0o644)
        shutil.move(path, target)
        lines.append(str(target.relative_to(copy)))
    (output / "flipped.txt").write_text("\n".join(lines) + "\n")
    print(f"moved {len(chosen)} of {len(files)} images to another class folder; listed in {output / 'flipped.txt'}")


def score(run: Path, flipped_list: Path) -> None:
    flipped = set(flipped_list.read_text().split())
    with open(run / "label_errors" / "label_errors.csv", newline="") as fh:
        ranked = list(csv.DictReader(fh))
    for share in (0.05, 0.10, 0.20):
        top = ranked[: round(share * len(ranked))]
        hits = sum(r["file"] in flipped for r in top)
        print(f"top {share:.0%} ({len(top)} images): {hits} flipped, precision {hits / len(top):.3f}, "
              f"recall {hits / len(flipped):.3f}")
    flagged = [r for r in ranked if r["likely_error"] == "true"]
    hits = sum(r["file"] in flipped for r in flagged)
    print(f"flagged as likely errors: {len(flagged)}, {hits} flipped, precision {hits / max(1, len(flagged)):.3f}, "
          f"recall {hits / len(flipped):.3f}")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("flip", "score"):
        sys.exit(__doc__)
    args = dict(a.split("=", 1) for a in argv[1:])
    if argv[0] == "flip":
        flip(Path(args["data"]).expanduser(), Path(args["output"]).expanduser(), float(args.get("share", 0.05)),
             int(args.get("seed", 0)))
    else:
        score(Path(args["run"]).expanduser(), Path(args["flipped"]).expanduser())


if __name__ == "__main__":
    main(sys.argv[1:])
