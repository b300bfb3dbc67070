"""``fit``: the epoch loop (train, validate, schedule, log, callbacks), resume, and the final test of best.pt."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import ReduceLROnPlateau

from cellcls.checkpoint import Checkpoint, load_checkpoint
from cellcls.data.preprocessing import Normalize
from cellcls.data.splits import write_split_lists
from cellcls.data.summary import count_table
from cellcls.evaluation.metrics import metric_mode
from cellcls.models import count_parameters
from cellcls.models.summary import summary_table
from cellcls.run_folder import BEST, RunFolder, atomic_write, write_json
from cellcls.training import distributed
from cellcls.training.build import Job, build_job
from cellcls.training.loggers import Loggers, create_loggers
from cellcls.training.loop import evaluate, train_one_epoch
from cellcls.training.runtime import epoch_seed

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    """The monitored metric's best value so far: which epoch ``best.pt`` holds."""

    metric: str
    mode: str
    best: float = math.nan
    best_epoch: int = 0

    def update(self, value: float, epoch: int) -> bool:
        if math.isnan(value):
            raise FloatingPointError(f"monitored metric {self.metric} is NaN at epoch {epoch}: training diverged")
        if math.isnan(self.best) or (value < self.best if self.mode == "min" else value > self.best):
            self.best, self.best_epoch = value, epoch
            return True
        return False


@dataclass
class FitState:
    """What callbacks see of the running job."""

    job: Job
    monitor: Monitor
    loggers: Loggers
    overrides: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    improved: bool = False
    should_stop: bool = False

    @property
    def cfg(self) -> DictConfig:
        return self.job.cfg

    @property
    def run(self) -> RunFolder:
        return self.job.run

    @property
    def is_main(self) -> bool:
        return self.job.runtime.is_main

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.job.data.preprocessing["mean"], self.job.data.preprocessing["std"])

    def checkpoint(self) -> Checkpoint:
        job = self.job
        return Checkpoint(
            epoch=self.epoch, model=job.net.state_dict(), model_spec=job.model_spec, classes=job.data.classes,
            preprocessing=job.data.preprocessing, config=OmegaConf.to_container(job.cfg, resolve=True),
            history=list(self.history),
            monitor={"metric": self.monitor.metric, "mode": self.monitor.mode, "best": self.monitor.best,
                     "best_epoch": self.monitor.best_epoch},
            training={
                "optimizer": job.optimizer.state_dict(),
                "scheduler": job.scheduler.state_dict() if job.scheduler is not None else None,
                "scaler": job.scaler.state_dict() if job.scaler.is_enabled() else None,
                "callbacks": {name: cb.state_dict() for name, cb in job.callbacks.items()},
            },
        )


def restore(state: FitState, ckpt: Checkpoint) -> int:
    """Load a checkpoint's training state into the job; returns the epoch it ended."""
    job = state.job
    job.net.load_state_dict(ckpt.model)
    job.optimizer.load_state_dict(ckpt.training["optimizer"])
    if job.scheduler is not None and ckpt.training.get("scheduler") is not None:
        job.scheduler.load_state_dict(ckpt.training["scheduler"])
    if ckpt.training.get("scaler"):
        job.scaler.load_state_dict(ckpt.training["scaler"])
    for name, cb in job.callbacks.items():
        cb.load_state_dict(ckpt.training.get("callbacks", {}).get(name, {}))
    state.monitor.best = float(ckpt.monitor.get("best", math.nan))
    state.monitor.best_epoch = int(ckpt.monitor.get("best_epoch", 0))
    state.history = list(ckpt.history)
    src_best = ckpt.run.best_checkpoint
    if state.is_main and src_best.is_file() and src_best.resolve() != job.run.best_checkpoint.resolve():
        job.run.checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_best, job.run.best_checkpoint)
    log.info("resumed from %s after epoch %d", ckpt.path, ckpt.epoch)
    return int(ckpt.epoch)


def fit(cfg: DictConfig, run_dir: Path, resume: Checkpoint | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train to ``trainer.max_epochs`` or until a callback stops it; test ``best.pt``; return a summary."""
    try:
        job = build_job(cfg, run_dir)
        t = cfg.trainer
        monitor = Monitor(str(t.monitor), metric_mode(str(t.monitor), str(t.monitor_mode)))
        loggers = create_loggers(cfg.logger, job.run) if job.runtime.is_main else Loggers(job.run)
        state = FitState(job, monitor, loggers, list(overrides or []))
        start = restore(state, resume) if resume is not None else 0
        loggers.start(state.history)
        describe(state, first=resume is None)
        for cb in job.callbacks.values():
            cb.on_fit_start(state)
        for epoch in range(start + 1, int(t.max_epochs) + 1):
            run_epoch(state, epoch)
            if state.should_stop:
                break
        return finish(state)
    finally:
        distributed.teardown()


def run_epoch(state: FitState, epoch: int) -> None:
    job, t = state.job, state.cfg.trainer
    started = time.perf_counter()
    state.epoch = epoch
    seed = epoch_seed(int(state.cfg.seed), epoch)
    torch.manual_seed(seed + job.runtime.dist.rank)  # each process augments its share differently
    job.data.train_generator.manual_seed(seed)
    if job.data.train_sampler is not None:
        job.data.train_sampler.set_epoch(epoch)

    def on_batch(step: int, images: torch.Tensor) -> None:
        for cb in job.callbacks.values():
            cb.on_train_batch(state, step, images)

    show = bool(t.progress_bar and job.runtime.is_main)
    train_loss, train_acc = train_one_epoch(
        job.model, job.net, job.data.loaders["train"], job.loss_fn, job.optimizer, job.scaler, job.runtime,
        t.gradient_clip, on_batch, f"epoch {epoch}/{t.max_epochs}" if show else None)
    val = evaluate(job.net, job.data.loaders["val"], job.runtime)
    metrics = {"train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val.loss,
               "val_accuracy": val.accuracy, "val_balanced_accuracy": val.balanced_accuracy,
               "lr": job.optimizer.param_groups[0]["lr"]}
    monitored = metrics[state.monitor.metric]
    state.improved = state.monitor.update(monitored, epoch)
    for cb in job.callbacks.values():
        cb.on_validation_end(state, metrics)
    state.should_stop = distributed.broadcast_flag(state.should_stop)
    if isinstance(job.scheduler, ReduceLROnPlateau):
        job.scheduler.step(monitored)
    elif job.scheduler is not None:
        job.scheduler.step()
    metrics["epoch_time_s"] = time.perf_counter() - started
    state.history.append({"epoch": epoch, **metrics})
    state.loggers.log_epoch(epoch, metrics)
    for cb in job.callbacks.values():
        cb.on_epoch_end(state, metrics)
    log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  lr %.2g%s  (%.1fs)",
             epoch, t.max_epochs, train_loss, train_acc, val.loss, val.accuracy, metrics["lr"],
             "  *" if state.improved else "", metrics["epoch_time_s"])


def describe(state: FitState, first: bool) -> None:
    """The run's log header and the files that describe it: config.yaml, splits, skipped files, model summary."""
    job, cfg = state.job, state.cfg
    data, run = job.data, job.run
    prep = data.preprocessing
    table = summary_table(job.net, (prep["channels"], *prep["image_size"]))
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
    log.info("model %s: %s parameters, device %s, precision %s%s", cfg.model.name, f"{count_parameters(job.net):,}",
             rt.device, rt.amp_dtype or "float32", f", {rt.dist.world_size} processes (DDP)" if rt.dist.enabled else "")
    log.info("model summary\n%s", table)
    if first:
        state.loggers.log_text("config", OmegaConf.to_yaml(cfg))
        state.loggers.log_text("model_summary", table)


def finish(state: FitState) -> dict[str, Any]:
    """Test best.pt on the test split, log the hyper-parameters, run the callbacks' ``on_fit_end``."""
    job, cfg = state.job, state.cfg
    summary: dict[str, Any] = {"monitor": state.monitor.metric, "best": state.monitor.best,
                               "best_epoch": state.monitor.best_epoch, "epochs_run": len(state.history),
                               "stopped_early": state.should_stop}
    if not job.runtime.is_main:
        return summary
    if "test" in job.data.loaders and job.run.best_checkpoint.is_file():
        best = load_checkpoint(job.run.best_checkpoint, BEST)
        job.net.load_state_dict(best.model)
        # the default layout, as `cellcls.evaluate` runs it, so its numbers reproduce these exactly
        job.net.to(memory_format=torch.contiguous_format)
        job.runtime.memory_format = torch.contiguous_format
        test = evaluate(job.net, job.data.loaders["test"], job.runtime)
        summary["test"] = {
            "checkpoint": "checkpoints/best.pt", "epoch": best.epoch, "split": "test",
            "num_images": len(job.data.splits["test"]), "loss": test.loss, "accuracy": test.accuracy,
            "balanced_accuracy": test.balanced_accuracy,
            "roc_auc": test.roc_auc if math.isfinite(test.roc_auc) else None,  # undefined with one class
        }
        write_json(job.run.test_metrics, summary["test"])
        log.info("test (best epoch %d): loss %.4f  acc %.4f  balanced acc %.4f  ROC-AUC %.4f",
                 best.epoch, test.loss, test.accuracy, test.balanced_accuracy, test.roc_auc)
    hparams = {"dataset": str(cfg.dataset.name), "model": str(cfg.model.name), "optim": str(cfg.optim.name),
               "lr": float(cfg.optim.lr), "weight_decay": float(cfg.optim.get("weight_decay") or 0.0),
               "batch_size": int(cfg.dataset.batch_size), "augment": str(cfg.augment.name),
               "class_weights": str(cfg.class_weights), "seed": int(cfg.seed)}
    final = {f"hparam/best_{state.monitor.metric}": float(state.monitor.best)}
    if "test" in summary:
        final["hparam/test_accuracy"] = summary["test"]["accuracy"]
    if all(math.isfinite(v) for v in final.values()):
        state.loggers.log_hparams(hparams, final)
    for cb in job.callbacks.values():
        cb.on_fit_end(state, summary)
    state.loggers.close()
    return summary
