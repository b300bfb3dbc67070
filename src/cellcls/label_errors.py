"""``python -m cellcls.label_errors run=<run folder trained with cv.folds=K> [grid=16]``

Ranks every image of a cross-validated run by how much the models that did not train on it doubt its given label
(confident learning on ``cv_predictions.csv``) and writes ``<run>/label_errors/``: ``label_errors.csv`` (rank, file,
given and suggested label, their probabilities, whether it is a likely error, its fold; most doubtful first) for a
person to review, and ``label_errors.png``, the top ``grid`` images as thumbnails. Prints how many images are likely
label errors and the first few.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cellcls.cli import command_args, fail, own_settings, whole_number
from cellcls.errors import ConfigError, DataError
from cellcls.evaluation.label_review import review_run

SETTINGS = ("run", "grid")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "label_errors", required=("run",))
        review, out = review_run(own["run"], whole_number("grid", own.get("grid", "16"), 1))
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as exc:
        return fail(exc)
    print(f"{int(review.issue.sum())} of {len(review.issue)} images are likely label errors "
          f"(class thresholds {', '.join(f'{t:.3f}' for t in review.thresholds)})")
    with open(out / "label_errors.csv", encoding="utf-8", errors="surrogateescape") as fh:
        for line in list(fh)[1:6]:
            print("  " + line.rstrip())
    print(f"written to {out} (label_errors.csv, label_errors.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
