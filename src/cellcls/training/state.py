"""The state of a running fit that callbacks see, the monitored metric, and restoring a checkpoint into it."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from cellcls.config.schema import TrainerConfig
from cellcls.infra.checkpoint import Checkpoint
from cellcls.data.preprocessing import Normalize
from cellcls.infra.run_folder import RunFolder
from cellcls.training.build import Job
from cellcls.infra.loggers import Loggers
from cellcls.training.loop import EpochProgress
from cellcls.training.preemption import StopRequest

log = logging.getLogger(__name__)


@dataclass
class Monitor:
    """The monitored metric's best value so far (which epoch ``best.pt`` holds), and whether any epoch has yet
    done clearly better than chance: ``chance`` is the value to beat, a margin beyond the metric of a model that
    knows only the class frequencies (:func:`cellcls.scoring.metrics.chance_level`, ``beyond_chance``).

    Patience (early stopping, the plateau scheduler) counts only from the first epoch that beats chance. A model
    still learning from its random start becomes confident before it becomes right, so its validation loss rises
    above the uncertain first epoch's for a while; counted from there, patience measured in epochs ends a small data
    set's run (a few dozen steps an epoch) in that phase, near chance (docs/QUALITY.md)."""

    metric: str
    mode: str
    best: float = math.nan
    best_epoch: int = 0
    chance: float = math.nan
    beat_chance: bool = False

    def update(self, value: float, epoch: int) -> bool:
        if math.isnan(value):
            raise FloatingPointError(f"monitored metric {self.metric} is NaN at epoch {epoch}: training diverged")
        if not self.beat_chance and (math.isnan(self.chance) or self._better(value, self.chance)):
            self.beat_chance = True
        if math.isnan(self.best) or self._better(value, self.best):
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def _better(self, value: float, than: float) -> bool:
        return value < than if self.mode == "min" else value > than

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``monitor`` section."""
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_epoch": self.best_epoch,
                "chance": self.chance, "beat_chance": self.beat_chance}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's ``monitor`` section (the metric and its chance level are this run's)."""
        self.best = float(state.get("best", math.nan))
        self.best_epoch = int(state.get("best_epoch", 0))
        # checkpoints from before the chance rule: their patience already counted from the first epoch
        self.beat_chance = bool(state.get("beat_chance", True))


class Stateful(Protocol):
    """What a checkpoint keeps of a callback (cellcls.training.callbacks.Callback)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitState:
    """What callbacks see of the running job."""

    job: Job
    monitor: Monitor
    loggers: Loggers
    overrides: list[str]
    # the fit loop's callbacks by name: their states go into each checkpoint and come back on resuming
    callbacks: Mapping[str, Stateful] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    improved: bool = False
    should_stop: bool = False
    position: EpochProgress | None = None  # where an interrupted epoch stopped (resume)
    stop_request: StopRequest | None = None

    @property
    def cfg(self) -> DictConfig:
        return self.job.cfg

    @property
    def trainer(self) -> TrainerConfig:
        return self.job.trainer

    @property
    def run(self) -> RunFolder:
        return self.job.run

    @property
    def is_main(self) -> bool:
        return self.job.runtime.is_main

    @property
    def normalize(self) -> Normalize:
        return self.job.data.preprocessing.normalize()

    def checkpoint(self, position: EpochProgress | None = None) -> Checkpoint:
        """The job's state after the last complete epoch (and, mid-epoch, how far the next one got). ``model`` holds
        the validated weights (the moving average when ``trainer.ema_decay`` is set; the raw ones then go to
        ``training['ema']['net']`` for resuming)."""
        job = self.job
        return Checkpoint(
            epoch=self.epoch, model=job.validated.state_dict(), model_spec=job.model_spec, classes=job.data.classes,
            preprocessing=job.data.preprocessing.to_dict(), config=OmegaConf.to_container(job.cfg, resolve=True),
            history=list(self.history),
            monitor=self.monitor.state_dict(),
            training={
                "optimizer": job.optimizer.state_dict(),
                "scheduler": job.scheduler.state_dict() if job.scheduler is not None else None,
                "scaler": job.scaler.state_dict() if job.scaler.is_enabled() else None,
                "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
                "position": {"epoch": self.epoch + 1, **position.state_dict()} if position is not None else None,
                "ema": {"net": job.net.state_dict(), **job.ema.state_dict()} if job.ema is not None else None,
            },
        )


def restore(state: FitState, ckpt: Checkpoint) -> int:
    """Load a checkpoint's training state into the job; returns the last complete epoch (a mid-epoch position
    goes to ``state.position``)."""
    job = state.job
    ema = ckpt.training.get("ema")
    if job.ema is not None and ema:
        job.net.load_state_dict(ema["net"])
        job.ema.module.load_state_dict(ckpt.model)
        job.ema.load_state_dict(ema)
    else:  # a run that adds (or drops) the EMA on resuming continues from the checkpoint's raw weights
        job.net.load_state_dict(ema["net"] if ema else ckpt.model)
        if job.ema is not None:
            job.ema.module.load_state_dict(ckpt.model)
    job.optimizer.load_state_dict(ckpt.training["optimizer"])
    if job.scheduler is not None and ckpt.training.get("scheduler") is not None:
        job.scheduler.load_state_dict(ckpt.training["scheduler"])
    if ckpt.training.get("scaler"):
        job.scaler.load_state_dict(ckpt.training["scaler"])
    for name, cb in state.callbacks.items():
        cb.load_state_dict(ckpt.training.get("callbacks", {}).get(name, {}))
    state.monitor.load_state_dict(ckpt.monitor)
    state.history = list(ckpt.history)
    pos = ckpt.training.get("position")
    if pos:
        state.position = EpochProgress.from_state(pos)
        log.info("resuming epoch %d at step %d", pos["epoch"], pos["step"])
    src_best = ckpt.run.best_checkpoint
    if state.is_main and src_best.is_file() and src_best.resolve() != job.run.best_checkpoint.resolve():
        job.run.checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_best, job.run.best_checkpoint)
    log.info("resumed from %s after epoch %d", ckpt.path, ckpt.epoch)
    return int(ckpt.epoch)
