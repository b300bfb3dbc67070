"""cellcls against its hand-written reference, recipe by recipe, over several seeds on one fixed split.

    python scripts/quality.py recipe=s1_malaria_lenet dataset.root=../shared/data/malaria [seeds=3] [split_seed=42]
        [reference=true] [output=docs/QUALITY.md|none] [any Hydra override, e.g. optim=adam trainer.max_epochs=15]

For each seed it trains ``python -m cellcls.train experiment=<recipe> seed=<s> dataset.split_seed=<split_seed>``
(a subprocess, exactly as a user runs it) and then ``scripts/reference.py``'s plain-PyTorch equivalent on the split
files that run wrote, with the same seed. The split is the same for every seed, so the spread is the training's own.
It prints mean +- standard deviation (over seeds) of test accuracy, balanced accuracy and ROC-AUC and of the
training time of both, and appends one row to docs/QUALITY.md with this command.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import train_reference  # noqa: E402  (the script beside this one)

REPO = Path(__file__).resolve().parents[1]
OWN = ("recipe", "seeds", "split_seed", "reference", "output", "workdir")
METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {"seeds": "3", "split_seed": "42", "reference": "true", "output": str(REPO / "docs" / "QUALITY.md"),
                           "workdir": "outputs/quality"}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"quality: expected key=value, got {arg!r}")
        (own.__setitem__(key, value) if key in OWN else overrides.append(arg))
    if "recipe" not in own:
        raise SystemExit("quality: recipe=<experiment name> is required, e.g. recipe=s1_malaria_lenet")
    return own, overrides


def run_cellcls(recipe: str, seed: int, split_seed: int, overrides: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "cellcls.train", f"experiment={recipe}", f"seed={seed}",
           f"dataset.split_seed={split_seed}", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"quality: cellcls run failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    with open(run_dir / "metrics.csv") as fh:
        train_seconds = sum(float(r["epoch_time_s"]) for r in csv.DictReader(fh))
    test = json.loads((run_dir / "test_metrics.json").read_text())
    return {"test": test, "train_seconds": train_seconds}


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


HEADER = ("| date | train / test images | seeds | test accuracy | test balanced accuracy | test ROC-AUC | "
          "training seconds | machine | command |\n|---|---|---|---|---|---|---|---|---|")


def add_row(doc: Path, recipe: str, row: str) -> None:
    """Add ``row`` to the table under ``## <recipe>`` in ``doc`` (the section is created at the end if missing).
    Each cell reads ``cellcls / reference``, mean ± standard deviation over the seeds."""
    lines = doc.read_text().splitlines() if doc.is_file() else ["# Learning quality"]
    heading = f"## {recipe}"
    if heading not in lines:
        lines += ["", heading, "", HEADER]
    at = lines.index(heading) + 1
    while at < len(lines) and not lines[at].startswith("## "):
        at += 1
    while lines[at - 1].strip() == "":  # after the section's last non-empty line (its table)
        at -= 1
    lines.insert(at, row)
    doc.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    own, overrides = parse(argv)
    recipe, seeds, split_seed = own["recipe"], int(own["seeds"]), int(own["split_seed"])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(own["workdir"]) / recipe / stamp
    mine, theirs = [], []
    for seed in range(seeds):
        run_dir = base / f"seed{seed}"
        mine.append(run_cellcls(recipe, seed, split_seed, overrides, run_dir))
        line = f"seed {seed}: cellcls " + " ".join(f"{k} {mine[-1]['test'].get(k) or float('nan'):.4f}" for k in METRICS)
        if own["reference"] == "true":
            theirs.append(train_reference(run_dir, seed))
            line += " | reference " + " ".join(f"{k} {theirs[-1]['test'][k]:.4f}" for k in METRICS)
        print(line, flush=True)

    table = [("test " + k, spread([m["test"].get(k) for m in mine]), spread([t["test"][k] for t in theirs])) for k in METRICS]
    table.append(("training seconds", spread([m["train_seconds"] for m in mine], 0),
                  spread([t["train_seconds"] for t in theirs], 0)))
    print(f"\n{recipe}, {seeds} seeds, split_seed {split_seed}, {' '.join(overrides)}")
    print(f"{'':<24}{'cellcls':>18}{'reference':>18}")
    for name, a, b in table:
        print(f"{name:<24}{a:>18}{b:>18}")
    print(f"run folders: {base}")

    if own["output"] != "none":
        shown = [a for a in argv if not a.startswith(("output=", "workdir="))]
        command = "python scripts/quality.py " + " ".join(shlex.quote(a) for a in shown)
        n_train = sum(1 for _ in open(base / "seed0" / "splits" / "train.csv")) - 1
        n_test = mine[0]["test"]["num_images"]
        cells = " | ".join(f"{a} / {b}" for _, a, b in table)
        row = (f"| {datetime.now(timezone.utc):%Y-%m-%d} | {n_train} / {n_test} | {seeds} | {cells} | "
               f"{platform.machine()}, {os.cpu_count()} cores | `{command}` |")
        add_row(Path(own["output"]), recipe, row)
        print(f"row appended to {own['output']}")


if __name__ == "__main__":
    main(sys.argv[1:])
