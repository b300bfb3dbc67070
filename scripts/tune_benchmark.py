"""The same Optuna search with and without pruning: epochs spent, wall time and best value.

    python scripts/tune_benchmark.py dataset.root=../shared/data/malaria [search=malaria] [trials=20]
        [pruners=none,file] [seeds=42] [work=/tmp/cellcls-tune-bench] [output=docs/BENCHMARKS.md|none] [overrides]

Runs ``python -m cellcls.tune`` once per pruner and sampler seed (same search space and trials, a fresh study each;
``file`` is the search file's own pruner, the others Optuna's defaults), then reads each study back: trials
complete/pruned, the epochs all trials trained, the wall time and the best value of the monitored metric. Appends one
row per study to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWN = ("search", "trials", "pruners", "seeds", "work", "output")


def main(argv: list[str]) -> int:
    import optuna

    own = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in OWN}
    overrides = [a for a in argv if a.split("=", 1)[0] not in OWN]
    work = Path(own.get("work", "/tmp/cellcls-tune-bench"))
    from omegaconf import OmegaConf

    from cellcls.training.tune import load_search

    rows = []
    spec = load_search(own.get("search", "malaria"))
    for seed, pruner in [(s, p) for s in own.get("seeds", "42").split(",") for p in own.get("pruners", "none,file").split(",")]:
        out = work / f"{pruner}_seed{seed}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        search = out / "search.yaml"  # the search with this sampler seed
        params = {k: {f: v for f, v in vars(p).items() if v is not None and v is not False} for k, p in spec.params.items()}
        search.write_text(OmegaConf.to_yaml(OmegaConf.create(
            {**vars(spec), "sampler": {**spec.sampler, "seed": int(seed)}, "params": params})))
        cmd = [sys.executable, "-m", "cellcls.tune", f"search={search}",
               f"trials={own.get('trials', 20)}", f"output={out}", f"study=bench_{pruner}", *overrides]
        if pruner != "file":  # file: the search file's own pruner
            cmd.append(f"pruner={pruner}")
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"tune failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        study = optuna.load_study(study_name=f"bench_{pruner}", storage=f"sqlite:///{out / 'study.db'}")
        states = [t.state.name for t in study.trials]
        epochs = sum(int(t.user_attrs.get("epochs", 0)) for t in study.trials)
        name = pruner if pruner != "file" else f"{spec.pruner.get('name')} (search file)"
        rows.append((f"{name}, sampler seed {seed}", states.count("COMPLETE"), states.count("PRUNED"), epochs, wall,
                     study.best_value, study.best_trial.number))
        print(f"{name} seed {seed}: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, {epochs} epochs, "
              f"{wall:.0f} s, best {study.best_value:.4f} (trial {study.best_trial.number})", flush=True)
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores" + (", CUDA" if torch.cuda.is_available() else ", CPU only")
    command = "python scripts/tune_benchmark.py " + " ".join(shlex.quote(a) for a in argv if not a.startswith("work="))
    lines = [f"| {datetime.now(timezone.utc):%Y-%m-%d} | {p} | {c} / {n} | {e} | {w:.0f} s | {b:.4f} (trial {t}) | "
             f"{machine} | `{command}` |" for p, c, n, e, w, b, t in rows]
    if own.get("output", "docs/BENCHMARKS.md") != "none":
        doc = REPO / own.get("output", "docs/BENCHMARKS.md")
        text = doc.read_text()
        marker = "<!-- results:tune -->"
        doc.write_text(text.replace(marker, "\n".join(lines) + f"\n{marker}") if marker in text
                       else text + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
