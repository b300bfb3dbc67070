"""Callbacks: what happens around the epoch loop, each one swappable from the ``callbacks`` config group.

Every entry of ``callbacks`` is ``name: {_target_: <class>, <arguments>}``; ``callbacks.<name>=null`` drops it.
The loop calls, in order: ``on_fit_start``; per epoch ``on_epoch_start``, ``on_train_batch`` (each batch, before
the step), ``on_validation_end`` (may set ``state.should_stop``), then the LR scheduler and the loggers, then
``on_epoch_end`` (checkpoints see the finished epoch); ``on_fit_end`` after the final test. A callback's
``state_dict`` is saved in the checkpoint under its name, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torchvision.utils import make_grid

from cellcls.config.targets import instantiate
from cellcls.scoring.multilabel import finding_text
from cellcls.infra.checkpoint import save_checkpoint
from cellcls.infra import plots
from cellcls.infra.run_folder import write_json

if TYPE_CHECKING:
    from cellcls.training.state import FitState

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook is optional."""

    def on_fit_start(self, state: FitState) -> None: ...
    def on_epoch_start(self, state: FitState, epoch: int) -> None: ...
    def on_train_batch(self, state: FitState, step: int, images: torch.Tensor, targets: torch.Tensor) -> None: ...
    def on_validation_end(self, state: FitState, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None: ...
    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...



def create_callbacks(section: Any, extra: Sequence[Callback] = ()) -> dict[str, Callback]:
    """The ``callbacks`` config list, each entry created from its ``_target_`` (a null entry is switched off), and
    ``extra`` ones a caller adds (a search's pruning) after them."""
    made = {name: instantiate(node, "callbacks") for name, node in (section or {}).items() if node is not None}
    return {**made, **{f"extra_{i}": cb for i, cb in enumerate(extra)}}


class EarlyStopping(Callback):
    """Stop when ``trainer.monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs in a row
    (Keras' EarlyStopping), counted from the first epoch that beats chance (:class:`~cellcls.training.state.Monitor`;
    before it, the run goes on)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"callbacks.early_stopping.patience must be an integer >= 0, got {patience!r}")
        self.patience = patience
        self.min_delta = abs(float(min_delta))
        self.best = math.nan
        self.wait = 0

    def step(self, value: float, mode: str) -> bool:
        """Record one epoch's value; True when training should stop."""
        if math.isnan(self.best) or (value < self.best - self.min_delta if mode == "min" else value > self.best + self.min_delta):
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.wait >= self.patience

    def on_validation_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if not state.monitor.beat_chance:  # patience starts once a model beats chance (see Monitor)
            return
        if self.step(metrics[state.monitor.metric], state.monitor.mode):
            state.should_stop = True
            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                     state.monitor.metric, self.wait, state.monitor.best, state.monitor.best_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", 0))
        self.best = float(state.get("best", math.nan))


class FreezeBackbone(Callback):
    """Train only the classifier head for the first ``epochs`` epochs, then everything (fine-tuning a pretrained
    backbone without wrecking it through a random head's first gradients). BatchNorm statistics keep adapting."""

    def __init__(self, epochs: int = 0) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"callbacks.freeze_backbone.epochs must be an integer >= 0, got {epochs!r}")
        self.epochs = epochs

    def on_fit_start(self, state: FitState) -> None:
        if self.epochs and state.job.runtime.dist.enabled:
            raise ValueError("callbacks.freeze_backbone.epochs > 0 cannot change which weights train under DDP "
                             "(torchrun); set it to 0 there")

    def on_epoch_start(self, state: FitState, epoch: int) -> None:
        if not self.epochs or epoch > self.epochs + 1:
            return
        from cellcls.models import split_backbone

        frozen = epoch <= self.epochs
        backbone, head = split_backbone(state.job.net)
        for _, p in backbone:
            p.requires_grad_(not frozen)
        if frozen and epoch == 1 or not frozen:
            log.info("epoch %d: %s", epoch, f"backbone frozen for {self.epochs} epoch(s); training the head's "
                     f"{sum(p.numel() for _, p in head):,} parameters" if frozen else "backbone unfrozen")


class ModelCheckpoint(Callback):
    """``checkpoints/last.pt`` after every epoch and ``checkpoints/best.pt`` when the monitored metric improves."""

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None:
        if not state.is_main:
            return
        ckpt = state.checkpoint()
        save_checkpoint(ckpt, state.run.last_checkpoint)
        if state.improved:
            save_checkpoint(ckpt, state.run.best_checkpoint)


class AugmentedSamples(Callback):
    """The first training batch, as the model sees it after augmentation: a figure and a logged image grid."""

    def __init__(self, count: int) -> None:
        self.count = int(count)

    def on_train_batch(self, state: FitState, step: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        if state.epoch != 1 or step != 0 or not state.is_main:
            return
        shown = state.normalize.inverse(images[:32].detach().float().cpu()).clamp(0, 1)
        grid = make_grid(shown, nrow=8, padding=2).mul(255).round().byte().permute(1, 2, 0).numpy()
        state.loggers.log_image("train/augmented_samples", grid)
        picked = (shown[: self.count] * 255).round().to(torch.uint8).numpy()
        classes = state.job.data.classes
        titles = [finding_text(t.tolist(), classes) if t.ndim else classes[int(t)] for t in targets[: self.count]]
        plots.save(plots.image_grid(list(picked), titles, suptitle=augmented_title(state.cfg.augment.name)),
                   state.run.augmented_samples)


def augmented_title(name: str) -> str:
    return f"Training images as the model sees them, after augment={name} (title: the true class)"


class TrainingCurves(Callback):
    """Loss and accuracy per epoch as ``training_curves.png`` and a logged image, with the epoch best.pt holds and
    the early-stopping point marked."""

    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None:
        if state.is_main and state.history:
            best = state.monitor.best_epoch if state.run.best_checkpoint.is_file() else None
            stopped = int(state.history[-1]["epoch"]) if summary.get("stopped_early") else None
            path = plots.save(plots.training_curves(state.history, best, stopped), state.run.training_curves)
            state.loggers.log_image("train/training_curves", plots.png_to_array(path))


class RunRecord(Callback):
    """``result.json``: status, the command's overrides, the monitored metric, best epoch and test metrics;
    what a sweep's summary table reads."""

    def on_fit_end(self, state: FitState, summary: dict[str, Any]) -> None:
        if state.is_main:
            write_json(state.run.result, {"status": "ok", "overrides": list(state.overrides), "mode": state.monitor.mode,
                                          **summary})
