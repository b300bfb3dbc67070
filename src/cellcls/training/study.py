"""Running an Optuna study's trials as cellcls runs: in this process, or in several worker processes sharing it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cellcls.config import compose_config
from cellcls.errors import TrainingInterrupted
from cellcls.processes import pid_running
from cellcls.infra.run_folder import RunFolder, write_json
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
        seed = self.spec.sampler.get("seed")
        if seed is not None:  # a restarted or second process continues the search instead of replaying its values
            offset = len(study.get_trials(deepcopy=False)) + 7919 * self.worker
            study.sampler = make_sampler({**dict(self.spec.sampler), "seed": int(seed) + offset})
        return study

    def trial_dir(self, number: int) -> Path:
        return self.output / "trials" / f"{number:03d}"


def objective(study: Study, trial) -> float:
    """Train one trial; its value is the run's best monitored metric (the cross-validated one with ``cv.folds``)."""
    import optuna

    from cellcls.training.run import train

    values = suggest(trial, study.spec.params)
    overrides = [*study.spec.overrides, *study.overrides, *as_overrides(values)]
    resume_from = trial.user_attrs.get("resume_from")  # a retry of a stopped trial continues its run
    if resume_from:
        overrides.append("trainer.resume=auto")
    cfg = compose_config(overrides)
    run_dir = Path(resume_from) if resume_from else study.trial_dir(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", study.worker)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("host", socket.gethostname())
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


class SearchInterrupted(BaseException):
    """A signal stopped a trial's training after a step (its ``last.pt`` resumes it): the search stops, the trial
    is marked failed with a retry that continues its run, and the same command carries on. A BaseException, so
    Optuna does not record it as an ordinary failure and start the next trial."""

    def __init__(self, trial: int, cause: TrainingInterrupted) -> None:
        super().__init__(f"{cause}; trial {trial} continues when the same cellcls.tune command runs again")
        self.trial, self.signum = trial, cause.signum


def counted(study) -> int:
    """Trials toward the study's total: finished (complete, pruned, failed without a retry) and running ones (a
    worker does not start a trial another is already running to the total)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("failed_trial") for t in trials}
    return sum(t.state.name in ("COMPLETE", "PRUNED", "RUNNING") or (t.state.name == "FAIL" and t.number not in retried)
               for t in trials)


def retry(study, trial, why: str) -> None:
    """Mark ``trial`` failed and queue it again with its values; the retry continues its run where it has a
    ``last.pt``. A killed trial is retried once; an interrupted one whenever it is interrupted."""
    from optuna.trial import TrialState

    if trial.state == TrialState.RUNNING:
        study.tell(trial.number, state=TrialState.FAIL)
    history = [*trial.user_attrs.get("retry_history", []), trial.number]
    if why == "killed" and len(history) > 1:
        log.warning("trial %d was %s again: not retried", trial.number, why)
        return
    attrs: dict[str, Any] = {"failed_trial": trial.number, "retry_history": history}
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and RunFolder(Path(run_dir)).last_checkpoint.is_file():
        attrs["resume_from"] = run_dir
    study.enqueue_trial(trial.params, user_attrs=attrs)
    log.warning("trial %d was %s: queued again%s", trial.number, why,
                f", continuing {run_dir} from its last checkpoint" if "resume_from" in attrs else "")


def recover_abandoned(study) -> None:
    """Trials left running by a process of this machine that no longer runs (SIGKILL, a crash): failed and retried
    now, not after the heartbeat's grace period (other machines' trials are left to the heartbeat)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and isinstance(pid, int) and not pid_running(pid):
            retry(study, trial, "killed")


def run_trials(study: Study, worker: int = 0) -> None:
    """Run trials until the study holds ``spec.trials`` counted ones (shared with any other worker); raises
    :class:`SearchInterrupted` when a signal stops a trial."""
    study.worker = worker
    optuna_study = study.open()
    recover_abandoned(optuna_study)
    remaining = study.spec.trials - counted(optuna_study)
    if remaining <= 0:
        log.info("study %s already holds %d finished trials", study.spec.study, counted(optuna_study))
        return
    log.info("worker %d: %d trial(s) to go in study %s (%s)", worker, remaining, study.spec.study, study.output)

    def run(trial) -> float:
        try:
            return objective(study, trial)
        except TrainingInterrupted as exc:
            raise SearchInterrupted(trial.number, exc) from None

    def stop_at_total(s, _trial) -> None:
        if counted(s) >= study.spec.trials:
            s.stop()

    try:
        optuna_study.optimize(run, catch=(Exception,), gc_after_trial=True, callbacks=[stop_at_total])
    except SearchInterrupted as stop:
        retry(optuna_study, optuna_study.get_trials(deepcopy=False)[stop.trial], "interrupted")
        raise


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
