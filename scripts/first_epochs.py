"""Does a recipe leave chance quickly, on every seed and split? The check behind the README's first command.

    python scripts/first_epochs.py dataset=malaria dataset.root=../shared/data/malaria model=lenet \
        [seeds=0,1,2,3,4] [split_seeds=42,7] [workdir=outputs/first_epochs] [label=<row name>] \
        [score=accuracy|balanced_accuracy] [left_chance=0.75] [near_chance=0.65] [any override]

For each seed x split seed it trains ``cellcls.train(<overrides> seed=<s> dataset.split_seed=<t>)`` in this process
(the Python API, as a user's script would) and reads the run's metrics.csv: the epoch at which validation accuracy
first reaches 0.75 ("left chance"), the epochs run (early stopping included), the best epoch's validation accuracy and
the test accuracy. A run that ends with test accuracy below 0.65 counts as ending near chance (both thresholds are
settings). ``score=balanced_accuracy`` judges both by balanced accuracy instead, for a data set whose majority class
alone comes near the first threshold (pneumonia). It prints one table row per combination and a summary line (mean +-
sd of the test score, the worst, and how many ended near chance).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

OWN = ("seeds", "split_seeds", "workdir", "label", "score", "left_chance", "near_chance")


def main(argv: list[str]) -> None:
    own = {"seeds": "0,1,2,3,4", "split_seeds": "42,7", "workdir": "outputs/first_epochs", "label": "run",
           "score": "accuracy", "left_chance": "0.75", "near_chance": "0.65"}
    overrides = []
    for arg in argv:
        key, _, value = arg.partition("=")
        (own.__setitem__(key, value) if key in OWN else overrides.append(arg))
    import cellcls

    score, left_chance, near_chance = own["score"], float(own["left_chance"]), float(own["near_chance"])
    if score not in ("accuracy", "balanced_accuracy"):
        raise SystemExit(f"score={score}: expected accuracy or balanced_accuracy")

    rows = []
    for split_seed in (int(s) for s in own["split_seeds"].split(",")):
        for seed in (int(s) for s in own["seeds"].split(",")):
            run_dir = Path(own["workdir"]) / own["label"] / f"split{split_seed}_seed{seed}"
            result = cellcls.train([*overrides, f"seed={seed}", f"dataset.split_seed={split_seed}",
                                    "trainer.progress_bar=false", "callbacks.augmented_samples=null"], run_dir)
            with open(run_dir / "metrics.csv") as fh:
                history = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
            left = next((int(r["epoch"]) for r in history if r[f"val_{score}"] >= left_chance), None)
            summary = json.loads((run_dir / "result.json").read_text())
            best = next(r for r in history if int(r["epoch"]) == summary["best_epoch"])
            rows.append({"split_seed": split_seed, "seed": seed, "left_chance": left, "epochs": len(history),
                         "best_val": best[f"val_{score}"], "test": (result.summary.get("test") or {})[score]})
            print(f"| {own['label']} | {split_seed} | {seed} | {left or '-'} | {len(history)} | "
                  f"{rows[-1]['best_val']:.3f} | {rows[-1]['test']:.3f} |", flush=True)
    tests = [r["test"] for r in rows]
    near = sum(t < near_chance for t in tests)
    lefts = [r["left_chance"] for r in rows if r["left_chance"] is not None]
    print(f"{own['label']}: test {score} {statistics.mean(tests):.3f} +- {statistics.stdev(tests):.3f} "
          f"(worst {min(tests):.3f}); ended near chance {near} of {len(rows)}; left chance at epoch "
          f"{statistics.mean(lefts) if lefts else float('nan'):.1f} on average ({len(rows) - len(lefts)} never)")


if __name__ == "__main__":
    main(sys.argv[1:])
