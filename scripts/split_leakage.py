"""How many validation/test images share their true group (original photo, patient) with training, per split rule.

    python scripts/split_leakage.py dataset=blood_cells dataset.root=../shared/data/blood_cells \\
        truth=../shared/data/MANIFEST.csv [seeds=0,1,2,42] [split_by=image,duplicates]

``truth`` is a CSV with columns ``file`` (relative to the CSV's folder) and ``group``: the ground truth the split
rules are judged against (for ../shared/data, the original smear photo of each blood-cell image). Prints one line per
seed, rule and held-out split; other arguments are training overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    own = {k: v for k, _, v in (a.partition("=") for a in argv) if k in ("truth", "seeds", "split_by")}
    overrides = [a for a in argv if a.partition("=")[0] not in own]
    if "truth" not in own:
        raise SystemExit("split_leakage: truth=<csv with file,group columns> is required")

    from cellcls.audit import read_truth
    from cellcls.config import compose_config
    from cellcls.data.datamodule import make_splits, resolve_root
    from cellcls.data.layouts import scan

    truth = read_truth(Path(own["truth"]))
    print("| seed | split_by | split | images sharing their group with train |")
    print("|---|---|---|---|")
    for seed in own.get("seeds", "0,1,2,42").split(","):
        for rule in own.get("split_by", "image,duplicates").split(","):
            cfg = compose_config([*overrides, f"seed={seed}", f"dataset.split_by={rule}"])
            scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
            splits = make_splits(cfg.dataset, scanned.splits, scanned.classes, int(seed), progress=False)[0]
            train = {truth.get(p.resolve()) for p in splits["train"].paths}
            for name in ("val", "test"):
                if name not in splits:
                    continue
                shared = sum(truth.get(p.resolve()) in train for p in splits[name].paths)
                total = len(splits[name])
                print(f"| {seed} | {rule} | {name} | {shared} of {total} ({shared / total:.1%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
