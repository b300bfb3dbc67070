"""How far a trained model's per-image trust signals can be trusted, measured on its test split.

    python scripts/trust.py runs=<run folder>[,<run folder>...] [levels=0.8,0.9,0.95] [device=cpu]

For each run and level it refits the conformal prediction sets on the run's own validation split
(``python -m cellcls.calibrate checkpoint=<run> conformal=<level>``, which replaces the run's stored set rule) and
evaluates the test split (``python -m cellcls.evaluate ... output=<run>/eval/test_sets-<level>``), then prints one
markdown row per run and level: data set, level, validation (calibration) and test images and groups, coverage with
its grouped 95% interval, mean set size, share of single-class sets and the lowest per-class coverage. Both steps
are subprocesses, as a user runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml


def parse(argv: list[str]) -> dict[str, str]:
    own = {"levels": "0.8,0.9,0.95", "device": "cpu"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("runs", "levels", "device"):
            sys.exit(f"unknown argument {arg!r}; expected runs=, levels=, device=")
        own[key] = value
    if "runs" not in own:
        sys.exit("runs=<run folder>[,<run folder>...] is required")
    return own


def run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def row(folder: Path, level: str, device: str) -> str:
    run("cellcls.calibrate", f"checkpoint={folder}", f"conformal={level}", f"device={device}")
    out = folder / "eval" / f"test_sets-{level}"
    run("cellcls.evaluate", f"checkpoint={folder}", f"output={out}", "plots=false", f"device={device}")
    result = json.loads((out / "metrics.json").read_text())
    ckpt_rule = result["prediction_sets"]
    fitted_on = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; from cellcls.infra.checkpoint import load_checkpoint; "
         "print(json.dumps(load_checkpoint(sys.argv[1], 'best.pt').calibration))", str(folder)],
        capture_output=True, text=True, check=True).stdout)["fitted_on"]
    lo, hi = ckpt_rule["coverage"]["ci95"]
    worst = min(r["coverage"] for r in ckpt_rule["per_class"].values())
    groups = result["interval"].get("groups")
    name = yaml.safe_load((folder / "config.yaml").read_text())["dataset"]["name"]
    return (f"| {name} | {level} | {fitted_on} | {result['num_images']}" + (f" ({groups} groups)" if groups else "")
            + f" | {ckpt_rule['coverage']['value']:.3f} [{lo:.3f}, {hi:.3f}] | {ckpt_rule['mean_size']:.2f} | "
            f"{100 * ckpt_rule['singletons']:.0f}% | {worst:.3f} | {result['accuracy']['value']:.3f} |")


def main(argv: list[str]) -> None:
    own = parse(argv)
    print("| data set | level | fitted on | test images | coverage [95% CI] | mean set size | single-class sets | "
          "lowest class coverage | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in own["runs"].split(","):
        for level in own["levels"].split(","):
            print(row(Path(folder).expanduser(), level, own["device"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
