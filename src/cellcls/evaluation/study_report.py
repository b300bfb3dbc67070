"""What a person reads after a search: the trials best first, Optuna's plots as images, and the best trial as an
experiment file that ``python -m cellcls.train`` runs as it is."""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cellcls.config.schema import GROUPS
from cellcls.infra.run_folder import atomic_write

log = logging.getLogger("cellcls.tune")
PLOTS = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
         "parallel_coordinate": "plot_parallel_coordinate", "intermediate_values": "plot_intermediate_values"}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: finished ones best first, then pruned (by their last reported value), then the rest."""
    sign = 1.0 if study.direction.name == "MINIMIZE" else -1.0

    def key(t) -> tuple[int, float]:
        if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value):
            return (0, sign * t.value)
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else math.inf
        return (1 if t.state.name == "PRUNED" else 2, sign * last if math.isfinite(last) else math.inf)

    params = list(dict.fromkeys(p for t in study.get_trials(deepcopy=False) for p in t.params))
    rows = []
    for rank, t in enumerate(sorted(study.get_trials(deepcopy=False), key=key), start=1):
        rows.append({"rank": rank, "trial": t.number, "state": t.state.name.lower(),
                     "value": t.value if t.value is not None else "", "epochs": t.user_attrs.get("epochs", ""),
                     **{p: t.params.get(p, "") for p in params}, "run_dir": t.user_attrs.get("run_dir", "")})
    return rows


def write_summary(study: Any, output: Path) -> list[dict[str, Any]]:
    """``summary.csv`` and ``summary.md`` in ``output``: every trial, best first."""
    rows = trial_rows(study)
    if not rows:
        return rows
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output / "summary.csv", buf.getvalue())
    cols = [c for c in rows[0] if c != "run_dir"]
    lines = [f"# Study {study.study_name}", "",
             f"{study.direction.name.lower()} {study.user_attrs.get('monitor', 'the monitored metric')}; "
             f"{sum(r['state'] == 'complete' for r in rows)} complete, {sum(r['state'] == 'pruned' for r in rows)} "
             f"pruned, {sum(r['state'] == 'fail' for r in rows)} failed; epochs spent: "
             f"{sum(int(r['epochs'] or 0) for r in rows)}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    atomic_write(output / "summary.md", "\n".join(lines) + "\n")
    return rows


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_plots(study: Any, output: Path) -> dict[str, Path]:
    """Optuna's optimisation history, parameter importances, parallel coordinates and per-epoch values as PNGs
    (those the study's trials allow: importances need two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written = {}
    for name, fn in PLOTS.items():
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib backend experimental
                warnings.simplefilter("ignore")
                ax = getattr(ovm, fn)(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            figure.savefig(output / f"{name}.png", dpi=110)
            plt.close(figure)
            written[name] = output / f"{name}.png"
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few trials for this plot
            log.info("no %s plot: %s", name, exc)
    return written


def write_best_experiment(best: DictConfig, choices: dict[str, str], plain: DictConfig, header: str, output: Path) -> Path:
    """``<output>/configs/experiment/best.yaml``: the group choices of the best trial and every setting where its
    config differs from those choices' defaults, so that ``--config-dir <output>/configs experiment=best``
    composes exactly the best trial's config."""
    groups = [g for g in GROUPS if g in choices and choices[g] is not None]
    lines = ["# @package _global_", *[f"# {line}" for line in header.splitlines()], "defaults:"]
    lines += [f"  - override /{g}: {choices[g]}" for g in groups]
    diff = _difference(OmegaConf.to_container(best, resolve=True), OmegaConf.to_container(plain, resolve=True))
    body = OmegaConf.to_yaml(OmegaConf.create(diff)) if diff else ""
    path = output / "configs" / "experiment" / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(lines) + "\n" + body)
    return path


def _difference(new: Any, old: Any) -> Any:
    """The parts of ``new`` that differ from ``old`` (nested dicts compared key by key; anything else whole)."""
    if isinstance(new, dict) and isinstance(old, dict):
        out = {}
        for k, v in new.items():
            if k not in old:
                out[k] = v
            elif v != old[k]:
                out[k] = _difference(v, old[k])
        return out
    return new
