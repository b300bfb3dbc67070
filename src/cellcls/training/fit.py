"""``fit``: the epoch loop (train, validate, schedule, log, callbacks), resume, and the final test of best.pt."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cellcls.infra.checkpoint import Checkpoint, save_checkpoint
from cellcls.data.splits import write_split_lists
from cellcls.data.summary import count_table
from cellcls.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from cellcls.metric_names import epoch_metrics, metric_mode
from cellcls.scoring.calibration import parse_operating_point
from cellcls.scoring.conformal import check_calibration_size, check_level
from cellcls.scoring.metrics import beyond_chance, chance_level
from cellcls.scoring.multilabel import chance_level as multilabel_chance
from cellcls.models import count_parameters, model_label
from cellcls.models.summary import summary_table
from cellcls.infra.run_folder import atomic_write
from cellcls.infra import distributed
from cellcls.training.build import Job, build_job
from cellcls.training.callbacks import Callback, create_callbacks
from cellcls.evaluation.recalibrate import recalibrate
from cellcls.training.final import calibrate_and_test
from cellcls.infra.loggers import Loggers, create_loggers
from cellcls.training.loop import EpochProgress, NonFinite, evaluate, train_one_epoch
from cellcls.training.optim import step_scheduler
from cellcls.training.preemption import StopRequest, stop_on_signals
from cellcls.infra.runtime import epoch_seed
from cellcls.training.state import FitState, Monitor, restore

log = logging.getLogger(__name__)


def fit(
    cfg: DictConfig, run_dir: Path, resume: Checkpoint | None = None, overrides: list[str] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train to ``trainer.max_epochs`` or until a callback stops it; test ``best.pt``; return a summary.
    ``callbacks`` run after the configured ones (named ``extra_<i>`` in checkpoints).

    Raises :class:`~cellcls.errors.TrainingDiverged` (non-finite loss or weights; nothing of that epoch is saved) and
    :class:`~cellcls.errors.TrainingInterrupted` (a signal; ``last.pt`` then holds the exact position).
    """
    with stop_on_signals() as request:
        # before the first epoch there is no step to finish: a signal stops at the next safe point, saying so
        request.phase = "before the first epoch (while preparing the data and the model); nothing to resume: run " \
                        "the same command again"
        try:
            return _fit(cfg, run_dir, resume, overrides, callbacks, request)
        finally:
            distributed.teardown()


def _fit(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None, overrides: Sequence[str] | None,
         callbacks: Sequence[Callback], request: StopRequest) -> dict[str, Any]:
    state, start = start_fit(cfg, run_dir, resume, overrides, callbacks, request)
    request.phase = None  # from here a signal stops after the current step, with a resumable last.pt
    state.stop_request = request
    try:
        for epoch in range(start + 1, state.trainer.max_epochs + 1):
            run_epoch(state, epoch)
            if state.should_stop:
                break
    except (TrainingDiverged, TrainingInterrupted):
        state.loggers.close()
        raise
    request.defer = True  # the test of best.pt is the last step: it finishes, so the run is complete
    summary = finish(state)
    if request.signum is not None:
        log.warning("%s came while best.pt was tested; the test finished and the run is complete",
                    signal.Signals(request.signum).name)
    return summary


def start_fit(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None, overrides: Sequence[str] | None,
              callbacks: Sequence[Callback], request: StopRequest) -> tuple[FitState, int]:
    """Build the job, its monitor, loggers and callbacks, restore ``resume`` into them and write the run's
    description; returns the state and the last complete epoch."""
    job = build_job(cfg, run_dir, starting_weights=resume is None, check_stop=request.check)
    request.check()
    loggers = create_loggers(cfg.logger, job.run) if job.runtime.is_main else Loggers(job.run)
    state = FitState(job, create_monitor(job), loggers, list(overrides or []),
                     create_callbacks(cfg.callbacks, callbacks))
    if job.runtime.is_main:
        for tmp in job.run.remove_stale_temporaries():
            log.info("removed %s, left by an interrupted write", tmp)
    start = restore(state, resume) if resume is not None else 0
    loggers.start(state.history)
    describe(state, first=resume is None)
    for cb in state.callbacks.values():
        cb.on_fit_start(state)
    if job.data.multilabel:
        refuse_single_label_rules(cfg)
    level = conformal_level(cfg)
    if level is not None:  # refused now, not after the last epoch
        check_calibration_size(level, len(job.data.splits["val"]))
    request.check_every = 10 if job.runtime.dist.enabled else 1
    request.check()
    return state, start


def refuse_single_label_rules(cfg: DictConfig) -> None:
    """A multi-label model gets per-finding thresholds fitted on validation (``operating_point`` applies to each
    finding); the single-label rules (temperature, prediction sets, the OOD rule) are refused before the first
    epoch."""
    asked = [k for k in ("calibrate", "conformal", "ood") if cfg.get(k)]
    if asked:
        raise ConfigError(f"{', '.join(asked)}: not available for a multi-label table yet (one sigmoid per finding); "
                          "each finding's threshold is fitted on validation instead (largest Youden's J, or "
                          f"operating_point=sensitivity:<level>); leave {' and '.join(asked)} unset")
    if cfg.get("operating_point"):
        parse_operating_point(str(cfg.operating_point))  # refused now, not after the last epoch


def conformal_level(cfg: DictConfig) -> float | None:
    """The ``conformal`` setting: the coverage the prediction sets aim for, or None."""
    value = cfg.get("conformal")
    return None if value is None else check_level(value)


def create_monitor(job: Job) -> Monitor:
    """``trainer.monitor`` with its direction and the value that counts as clearly better than chance on this
    job's validation split."""
    metric, splits = job.trainer.monitor, job.data.splits
    if job.data.multilabel:
        chance = multilabel_chance(metric, splits["val"].training_targets().numpy(),  # type: ignore[union-attr]
                                   splits["train"].training_targets().numpy())  # type: ignore[union-attr]
    else:
        chance = chance_level(metric, splits["val"].labels, splits["train"].labels, len(job.data.classes))
    return Monitor(metric, metric_mode(metric, job.trainer.monitor_mode), chance=beyond_chance(metric, chance))


def run_epoch(state: FitState, epoch: int) -> None:
    """One epoch: train, validate, update the monitor, step the scheduler, checkpoint (callbacks) and log."""
    job, t = state.job, state.trainer
    started = time.perf_counter()
    done = train_epoch(state, epoch)
    val = evaluate(job.validated, job.data.loaders["val"], job.runtime)
    if not math.isfinite(val.loss):
        raise diverged(state, epoch, f"the validation loss is {val.loss:g} after the epoch")
    metrics = {**epoch_metrics("train", loss=done.loss, accuracy=done.accuracy),
               **epoch_metrics("val", loss=val.loss, accuracy=val.accuracy, balanced_accuracy=val.balanced_accuracy),
               "lr": job.optimizer.param_groups[0]["lr"]}
    if done.skipped:
        metrics["skipped_batches"] = done.skipped
    monitored = metrics[state.monitor.metric]
    update_monitor(state, epoch, monitored)
    for cb in state.callbacks.values():
        cb.on_validation_end(state, metrics)
    state.should_stop = distributed.broadcast_flag(state.should_stop)
    # the plateau scheduler's patience, like early stopping's, counts from the first epoch better than chance
    step_scheduler(job.scheduler, monitored, patience=state.monitor.beat_chance)
    metrics["epoch_time_s"] = time.perf_counter() - started
    state.history.append({"epoch": epoch, **metrics})
    # checkpoints first: metrics.csv never lists an epoch that last.pt does not hold
    for cb in state.callbacks.values():
        cb.on_epoch_end(state, metrics)
    state.loggers.log_epoch(epoch, metrics)
    log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  lr %.2g%s  (%.1fs)",
             epoch, t.max_epochs, done.loss, done.accuracy, val.loss, val.accuracy, metrics["lr"],
             "  *" if state.improved else "", metrics["epoch_time_s"])


def train_epoch(state: FitState, epoch: int) -> EpochProgress:
    """The epoch's training pass, seeded by the epoch (an interrupted epoch resumes where it stopped)."""
    job, t = state.job, state.trainer
    state.epoch = epoch
    seed = epoch_seed(int(state.cfg.seed), epoch)
    torch.manual_seed(seed + job.runtime.dist.rank)  # each process augments its share differently
    job.data.train_generator.manual_seed(seed)
    if job.data.train_sampler is not None:
        job.data.train_sampler.set_epoch(epoch)

    def on_batch(step: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        for cb in state.callbacks.values():
            cb.on_train_batch(state, step, images, targets)

    for cb in state.callbacks.values():
        cb.on_epoch_start(state, epoch)
    show = bool(t.progress_bar and job.runtime.is_main)
    resume, state.position = state.position, None
    try:
        done = train_one_epoch(job.train_step(), job.data.loaders["train"], on_batch,
                               f"epoch {epoch}/{t.max_epochs}" if show else None,
                               NonFinite(t.on_nonfinite, t.max_skipped_batches), resume, state.stop_request)
    except TrainingDiverged as exc:
        raise diverged(state, epoch, str(exc)) from None
    if not done.complete:
        interrupt(state, epoch, done)
    return done


def update_monitor(state: FitState, epoch: int, value: float) -> None:
    """Record the epoch's monitored value (``state.improved``: a new best), saying when it first beats chance."""
    had_beaten = state.monitor.beat_chance
    state.improved = state.monitor.update(value, epoch)
    if state.monitor.beat_chance and not had_beaten and epoch > 1:
        log.info("epoch %d: %s %.4f is clearly better than chance (%.4f) for the first time; patience counts from "
                 "here", epoch, state.monitor.metric, value, state.monitor.chance)


def diverged(state: FitState, epoch: int, what: str) -> TrainingDiverged:
    """The one message of a diverged run: where, what was kept, what to try."""
    t, lr = state.trainer, state.job.optimizer.param_groups[0]["lr"]
    kept = (f"checkpoints/last.pt holds epoch {epoch - 1}, best.pt epoch {state.monitor.best_epoch}"
            if epoch > 1 else "no checkpoint was written")
    tips = [f"a lower optim.lr (now {lr:g})"]
    if not t.gradient_clip:
        tips.append("trainer.gradient_clip=1.0")
    if state.job.runtime.amp_dtype is not None:
        tips.append("trainer.precision=32")
    if t.on_nonfinite == "stop":
        tips.append("trainer.on_nonfinite=skip_batch for a rare bad batch")
    return TrainingDiverged(f"training diverged in epoch {epoch}: {what}; nothing of this epoch was saved ({kept}). "
                            f"Try {', '.join(tips)}")


def interrupt(state: FitState, epoch: int, done: EpochProgress) -> None:
    """Write the exact position to last.pt and stop (raises :class:`TrainingInterrupted`)."""
    assert state.stop_request is not None and state.stop_request.signum is not None
    signum = state.stop_request.signum
    state.epoch = epoch - 1
    if state.is_main:
        save_checkpoint(state.checkpoint(position=done), state.run.last_checkpoint)
    chain = state.stop_request.chain if signum == getattr(signal, "SIGUSR2", None) else None
    raise TrainingInterrupted(f"interrupted by {signal.Signals(signum).name} in epoch {epoch} after step {done.step}; "
                              f"resume with trainer.resume={state.run.root}", signum, chain)


def describe(state: FitState, first: bool) -> None:
    """The run's log header and the files that describe it: config.yaml, splits, skipped files, model summary."""
    job, cfg = state.job, state.cfg
    data, run = job.data, job.run
    prep = data.preprocessing
    table = summary_table(job.net, (prep.channels, *prep.image_size))
    if job.runtime.is_main:
        write_split_lists(run, data.splits, data.root, data.classes)
        # the resolved config beside the splits: what `scripts/reference.py` and a reader of the folder need
        atomic_write(run.config, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write(run.model_summary, table + "\n")
        if data.skipped:
            atomic_write(run.skipped_files, "".join(f"{p}\t{why}\n" for p, why in data.skipped))
            log.warning("skipped %d unreadable image(s); listed in skipped_files.txt", len(data.skipped))
    if data.ignored:
        log.warning("ignored %d non-image file(s), e.g. %s", len(data.ignored), data.ignored[0])
    log.info("data %s at %s\n%s", cfg.dataset.name, data.root, count_table(data.splits, data.classes))
    rt = job.runtime
    log.info("model %s: %s parameters, device %s, precision %s%s", model_label(cfg.model), f"{count_parameters(job.net):,}",
             rt.device, rt.amp_dtype or "float32", f", {rt.dist.world_size} processes (DDP)" if rt.dist.enabled else "")
    log.info("model summary\n%s", table)
    if first:
        state.loggers.log_text("config", OmegaConf.to_yaml(cfg))
        state.loggers.log_text("model_summary", table)
        if cfg.model.get("starting_weights"):
            state.loggers.log_text("starting_weights", OmegaConf.to_yaml(cfg.model.starting_weights))


def finish(state: FitState) -> dict[str, Any]:
    """Test best.pt on the test split, log the hyper-parameters, run the callbacks' ``on_fit_end``."""
    job, cfg = state.job, state.cfg
    summary: dict[str, Any] = {"monitor": state.monitor.metric, "best": state.monitor.best,
                               "best_epoch": state.monitor.best_epoch, "epochs_run": len(state.history),
                               "stopped_early": state.should_stop}
    if not job.runtime.is_main:
        return summary
    test = calibrate_and_test(job, bool(cfg.calibrate), cfg.operating_point, conformal_level(cfg))
    if test is not None:
        summary["test"] = test
    if cfg.get("ood") is not None and job.run.best_checkpoint.is_file():
        # from best.pt as evaluate loads it: training features without augmentation; this process holds the lock
        _, rule = recalibrate(job.run.best_checkpoint, device=str(job.runtime.device), ood=float(cfg.ood), lock=False)
        assert rule is not None
        log.info("out-of-distribution rule fitted on %s", rule.fitted_on)
    prep = job.data.preprocessing
    # the model and data first: TensorBoard's HParams table shows its first columns by default
    hparams = {"model": model_label(cfg.model), "dataset": str(cfg.dataset.name),
               "image_size": "x".join(str(v) for v in (*prep.image_size, prep.channels)),
               "parameters": count_parameters(job.net), "epochs": len(state.history),
               "max_epochs": state.trainer.max_epochs, "optim": str(cfg.optim.name), "lr": float(cfg.optim.lr),
               "weight_decay": float(cfg.optim.get("weight_decay") or 0.0), "batch_size": int(cfg.dataset.batch_size),
               "augment": str(cfg.augment.name), "class_weights": str(cfg.class_weights),
               "label_smoothing": float(cfg.get("label_smoothing") or 0.0),
               "ema_decay": state.trainer.ema_decay or 0.0, "seed": int(cfg.seed),
               "starting_weights": str((cfg.model.get("starting_weights") or {}).get("name") or "random")}
    final = {f"hparam/best_{state.monitor.metric}": float(state.monitor.best)}
    if "test" in summary:
        final["hparam/test_accuracy"] = summary["test"]["accuracy"]
    if all(math.isfinite(v) for v in final.values()):
        state.loggers.log_hparams(hparams, final)
    for cb in state.callbacks.values():
        cb.on_fit_end(state, summary)
    state.loggers.close()
    return summary
