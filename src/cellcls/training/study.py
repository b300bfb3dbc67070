"""Running an Optuna study's trials as cellcls runs: in this process, or in several worker processes sharing it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cellcls.config import compose_config
from cellcls.run_folder import RunFolder, write_json
from cellcls.training.sweep import direction
from cellcls.training.tune import (
    SearchSpec,
    TrialPruning,
    as_overrides,
    make_pruner,
    make_sampler,
    make_storage,
    suggest,
)

log = logging.getLogger("cellcls.tune")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@dataclass
class Study:
    """A search, its training overrides and where it lives."""

    spec: SearchSpec
    overrides: list[str]
    output: Path
    storage: str | None = None
    worker: int = 0  # which worker process runs this study's trials (0: the command itself)

    def open(self):
        """The Optuna study, created on first use and loaded (resumed) after; its direction follows
        ``trainer.monitor``."""
        import optuna

        t = compose_config([*self.spec.overrides, *self.overrides]).trainer
        study = optuna.create_study(study_name=self.spec.study, storage=make_storage(self.storage, self.output),
                                    sampler=make_sampler(dict(self.spec.sampler)),
                                    pruner=make_pruner(dict(self.spec.pruner)),
                                    direction=direction(str(t.monitor), str(t.monitor_mode)), load_if_exists=True)
        if "monitor" not in study.user_attrs:  # named in the summary
            study.set_user_attr("monitor", str(t.monitor))
        return study

    def trial_dir(self, number: int) -> Path:
        return self.output / "trials" / f"{number:03d}"


def finished(study) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def objective(study: Study, trial) -> float:
    """Train one trial; its value is the run's best monitored metric (the cross-validated one with ``cv.folds``)."""
    import optuna

    from cellcls.training.run import train

    values = suggest(trial, study.spec.params)
    overrides = [*study.spec.overrides, *study.overrides, *as_overrides(values)]
    cfg = compose_config(overrides)
    run_dir = study.trial_dir(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", study.worker)
    cross_validated = int(cfg.cv.folds) >= 2
    pruning = TrialPruning(trial)
    handler = logging.FileHandler(_mkdir(run_dir) / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        log.info("trial %d: %s -> %s", trial.number, " ".join(as_overrides(values)), run_dir)
        summary = train(cfg, run_dir, overrides, callbacks=() if cross_validated else (pruning,))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    trial.set_user_attr("epochs", _epochs(summary, run_dir))
    if pruning.pruned_at is not None:
        record = RunFolder(run_dir).result
        result = json.loads(record.read_text()) if record.is_file() else {}
        write_json(record, {**result, "status": "pruned", "pruned_at_epoch": pruning.pruned_at})
        raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
    return float(summary["best"])


def _epochs(summary: dict[str, Any], run_dir: Path) -> int:
    """Epochs the trial trained: with cross-validation, its folds' together."""
    if "folds" in summary:
        records = [RunFolder(run_dir).fold(k).result for k in range(int(summary["folds"]))]
        return sum(int(json.loads(r.read_text()).get("epochs_run", 0)) for r in records if r.is_file())
    return int(summary.get("epochs_run", 0))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_trials(study: Study, worker: int = 0) -> None:
    """Run trials until the study holds ``spec.trials`` finished ones (shared with any other worker)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study.worker = worker
    optuna_study = study.open()
    remaining = study.spec.trials - finished(optuna_study)
    if remaining <= 0:
        log.info("study %s already holds %d finished trials", study.spec.study, finished(optuna_study))
        return
    log.info("worker %d: %d trial(s) to go in study %s (%s)", worker, remaining, study.spec.study, study.output)

    def run(trial) -> float:
        return objective(study, trial)

    optuna_study.optimize(
        run, n_trials=remaining, catch=(Exception,), gc_after_trial=True,
        # running trials count too: a worker does not start a trial another one is already running to the total
        callbacks=[MaxTrialsCallback(study.spec.trials, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.FAIL, TrialState.RUNNING))])


def spawn_workers(argv: Sequence[str], jobs: int) -> list[subprocess.Popen]:
    """``jobs`` worker processes running the same command on the shared study (numbered from 1; this process waits
    and reports); with several GPUs each takes one, round-robin."""
    import torch

    gpus = torch.cuda.device_count()
    procs = []
    for worker in range(1, jobs + 1):
        env = dict(os.environ)
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = str(worker % gpus)
        args = [a for a in argv if not a.startswith(("jobs=", "worker="))]
        procs.append(subprocess.Popen([sys.executable, "-m", "cellcls.tune", *args, "jobs=1", f"worker={worker}"],
                                      env=env))
    return procs


def report(study: Study) -> str:
    """Write the summary, the plots and the best trial's experiment file; the lines to print."""
    from hydra import compose, initialize_config_dir

    from cellcls.evaluation.study_report import (
        write_best_experiment,
        write_plots,
        write_summary,
    )
    from cellcls.paths import config_dir

    optuna_study = study.open()
    rows = write_summary(optuna_study, study.output)
    plots = write_plots(optuna_study, study.output)
    states = [r["state"] for r in rows]
    lines = [f"study {study.spec.study}: {states.count('complete')} complete, {states.count('pruned')} pruned, "
             f"{states.count('fail')} failed trials; epochs spent {sum(int(r['epochs'] or 0) for r in rows)}",
             f"summary: {study.output / 'summary.md'}; plots: {', '.join(p.name for p in plots.values()) or 'none'}"]
    complete = [t for t in optuna_study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return "\n".join([*lines, "no trial finished: no best configuration"])
    best = optuna_study.best_trial
    overrides = [*study.spec.overrides, *study.overrides, *as_overrides(best.params)]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        full = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        choices = {k: v for k, v in full.hydra.runtime.choices.items() if "/" not in k}
        plain = compose(config_name="train", overrides=[f"{g}={c}" for g, c in choices.items()
                                                        if c is not None and g != "experiment"])
    best_cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])  # the trial's config, as train sees it
    configs = study.output / "configs"
    header = (f"The best trial (#{best.number}, {optuna_study.direction.name.lower()} value {best.value:.6g}) of the "
              f"cellcls study {study.spec.study}:\n  python -m cellcls.train --config-dir {configs} experiment=best")
    path = write_best_experiment(best_cfg, choices, plain, header, study.output)
    return "\n".join([*lines, f"best: trial {best.number}, value {best.value:.6g}: {' '.join(as_overrides(best.params))}",
                      f"as an experiment: {path}", f"  python -m cellcls.train --config-dir {configs} experiment=best"])
