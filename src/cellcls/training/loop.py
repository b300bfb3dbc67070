"""One training epoch and one evaluation pass, as plain functions with explicit arguments (the style of
torchvision's classification reference), so scripts and benchmarks call exactly what ``fit`` calls."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cellcls.data.mixing import BatchMix
from cellcls.errors import TrainingDiverged
from cellcls.scoring.inference import Scores, run_inference, score
from cellcls.infra import distributed
from cellcls.training.ema import EMA
from cellcls.scoring.losses import l2_penalty
from cellcls.infra.runtime import Runtime

BatchHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class EpochProgress:
    """How far an epoch got: batches done and running totals, and the RNG state to continue from (a mid-epoch
    checkpoint stores this, so a resumed epoch reproduces the uninterrupted one)."""

    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    skipped: int = 0  # batches left out for a non-finite loss (trainer.on_nonfinite=skip_batch)
    complete: bool = False
    rng: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else math.nan

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``training.position`` (beside the epoch it belongs to)."""
        return {"step": self.step, "loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen,
                "skipped": self.skipped, "rng": self.rng}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> EpochProgress:
        """An interrupted epoch's progress read back from :meth:`state_dict`'s form."""
        return cls(int(state["step"]), float(state["loss_sum"]), int(state["correct"]), int(state["seen"]),
                   int(state.get("skipped", 0)), False, dict(state["rng"]))


@dataclass(frozen=True)
class NonFinite:
    """``trainer.on_nonfinite``: ``stop`` the run at the first NaN/infinite loss, or ``skip_batch`` (at most
    ``max_skipped`` per epoch, then stop)."""

    action: str = "stop"
    max_skipped: int = 10


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainStep:
    """One optimisation step, everything it holds: ``model`` (``net`` itself, or its DDP/compiled wrapper), loss,
    optimiser, grad scaler, gradient clipping and accumulation, MixUp/CutMix and the weights' EMA.

    The optimiser steps once every ``accumulate`` batches (and after the last) on their summed gradients of
    ``loss / accumulate``; ``ema`` follows each step; ``mix`` mixes each batch on the device.
    """

    model: nn.Module
    net: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runtime: Runtime
    gradient_clip: float | None = None
    accumulate: int = 1
    mix: BatchMix | None = None
    ema: EMA | None = None

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, loss (with the model's L2 terms) and the targets as trained on (mixed, when mixing)."""
        images = images.to(self.runtime.device, non_blocking=True, memory_format=self.runtime.memory_format)
        targets = targets.to(self.runtime.device, non_blocking=True)
        if self.mix is not None:
            images, targets = self.mix(images, targets)
        with self.runtime.autocast():
            logits = self.model(images)
            loss = self.loss_fn(logits, targets) + l2_penalty(self.net)
        return logits, loss, targets

    def backward(self, loss: torch.Tensor, window_end: bool) -> None:
        """Accumulate ``loss``'s gradients; at the end of an accumulation window, clip, step, and update the EMA."""
        self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()
        if not window_end:
            return
        if self.gradient_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.net.parameters(), float(self.gradient_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.net)


def train_one_epoch(
    trainer: TrainStep,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    on_batch: BatchHook | None = None,
    progress: str | None = None,
    nonfinite: NonFinite = NonFinite(),
    resume: EpochProgress | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> EpochProgress:
    """Train over ``loader`` once with ``trainer``'s step; the reported training accuracy is the loss' ``hits``
    (a mixed image counts as its larger share's class; a multi-label image when every finding is right).

    ``on_batch(step, images, targets)`` sees each batch before the step (and before mixing). A non-finite loss raises
    :class:`~cellcls.errors.TrainingDiverged` before it reaches the weights (on CUDA within 16 steps: checking every
    step would stall the GPU). When ``interrupted()`` turns true the epoch stops after the current step and the
    returned progress is not ``complete``; ``resume`` continues such an epoch where it stopped.
    """
    trainer.model.train()
    device = trainer.runtime.device
    done = resume or EpochProgress()
    # running sums stay on the device: reading them every step would stall the GPU's queue of work
    total_loss = torch.tensor(done.loss_sum, dtype=torch.float64, device=device)
    correct = torch.tensor(done.correct, dtype=torch.int64, device=device)
    seen, skipped = done.seen, done.skipped
    bad = torch.zeros((), dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" or nonfinite.action == "skip_batch" else 16
    batches = iter(loader)
    for _ in range(done.step):  # the batches an interrupted epoch had trained on: drawn again, not trained on
        next(batches)
    if done.rng:
        _set_rng_state(done.rng, device)
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(batches, desc=progress, leave=False, disable=progress is None, mininterval=0.5, dynamic_ncols=True,
               initial=done.step, total=total)
    step = done.step - 1
    trainer.optimizer.zero_grad(set_to_none=True)
    for step, (images, targets) in enumerate(bar, start=done.step):
        if targets.numel() == 0:  # every image of the batch failed to decode (uncached mode)
            continue
        if on_batch is not None:
            on_batch(step, images, targets)
        logits, loss, targets = trainer.forward(images, targets)
        bad |= ~torch.isfinite(loss.detach())
        if step % check_every == 0 and bool(bad):
            if nonfinite.action == "skip_batch" and skipped < nonfinite.max_skipped:
                skipped += 1
                bad.zero_()
                trainer.optimizer.zero_grad(set_to_none=True)  # the window's other gradients go with it
                continue
            raise TrainingDiverged(f"the training loss is {float(loss.detach()):g} at step {step + 1}"
                                   + (f" ({skipped} batches skipped before)" if skipped else ""))
        window_end = (step + 1) % trainer.accumulate == 0 or (total is not None and step + 1 == total)
        trainer.backward(loss, window_end)
        n = targets.shape[0]
        total_loss += loss.detach().double() * n
        correct += trainer.loss_fn.hits(logits.detach(), targets)
        seen += n
        if progress is not None and step % 20 == 0:
            bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.4f}", refresh=False)
        if window_end and interrupted is not None and interrupted():
            bar.close()
            return EpochProgress(step + 1, float(total_loss), int(correct), seen, skipped, False, _rng_state(device))
    bar.close()
    if bool(bad):
        raise TrainingDiverged(f"the training loss became non-finite by step {step + 1}")
    if skipped and not seen:
        raise TrainingDiverged(f"the training loss was non-finite in every batch of the epoch ({skipped} skipped)")
    if not all(bool(torch.isfinite(p).all()) for p in trainer.net.parameters()):
        raise TrainingDiverged("the weights are no longer finite at the end of the epoch")
    total, right, count = distributed.all_reduce_sum([float(total_loss), float(correct), float(seen)])
    return EpochProgress(step + 1, total, int(right), int(count), skipped, True)


def evaluate(net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime) -> Scores:
    """Loss (unweighted, with the model's L2 terms as Keras reports it), accuracy, balanced accuracy, ROC-AUC."""
    logits, targets = run_inference(net, loader, runtime.device, runtime.amp_dtype, runtime.memory_format)
    return score(net, logits, targets)
