"""The learning-rate range test (Smith 2017; fastai's ``lr_find``): train a few hundred steps on a throw-away copy
of the job's model while the learning rate grows exponentially, and read off where the loss falls fastest.

Every parameter group's rate is scaled together, so ``optim.backbone_lr_scale`` and friends keep their ratios; the
suggested value is what ``optim.lr`` should be. Warm-up and schedules are not applied: the test replaces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import cycle
from typing import Any

import numpy as np

from cellcls.training.build import Job

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (fastai's)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
MIN_FALL = 0.05  # a fall of the loss smaller than this share of its start is noise, not learning


@dataclass
class RangeTest:
    """The rates tried, the loss at each and its smoothed curve, the suggestion and why the test stopped."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    minimum: float | None  # the rate of the lowest smoothed loss
    stopped: str
    rule: str = ""  # how the suggestion was chosen

    def rows(self) -> list[dict[str, Any]]:
        return [{"step": i, "lr": f"{lr:.6g}", "loss": f"{loss:.6f}", "smoothed": f"{s:.6f}"}
                for i, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed))]


def range_test(job: Job, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200) -> RangeTest:
    """Run the test on ``job`` (its model and optimiser are changed: build a job for it alone)."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"start_lr={start_lr:g} and end_lr={end_lr:g}: need 0 < start_lr < end_lr")
    step = job.train_step()
    step.accumulate, step.ema = 1, None  # one optimiser step per batch; no average of the weights
    base = float(job.cfg.optim.lr)
    ratios = [float(g["lr"]) / base for g in job.optimizer.param_groups]
    job.net.train()
    lrs, losses, smoothed = [], [], []
    average, best, stopped = 0.0, math.inf, f"all {steps} steps"
    batches = cycle(job.data.loaders["train"])  # re-iterates the loader: a new shuffle each pass
    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / max(steps - 1, 1))
        for group, ratio in zip(job.optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        images, targets = next(batches)
        _, loss, _ = step.forward(images, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            stopped = f"the loss was not finite at lr {lr:.3g}"
            break
        step.backward(loss, window_end=True)
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        current = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(current)
        best = min(best, current)
        if i > 10 and current > DIVERGED * best:
            stopped = f"the loss diverged at lr {lr:.3g} ({current:.3g}, over {DIVERGED:g}x its minimum)"
            break
    suggestion, minimum, rule = suggest(lrs, smoothed)
    return RangeTest(lrs, losses, smoothed, suggestion, minimum, stopped, rule)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None, str]:
    """(suggested rate, the rate of the lowest smoothed loss, how the suggestion was chosen). Where the loss falls
    clearly (by ``MIN_FALL`` of its starting value) before its minimum: the rate of its steepest fall against
    log(lr). Where it stays flat until it diverges: the minimum's rate / 10 (the older fastai rule), the highest rate
    that is still safely stable. The first tenth of the curve is skipped: the average is still settling there."""
    if len(lrs) < 20:
        return None, None, "too few steps before the loss diverged"
    loss = np.asarray(smoothed)
    low = len(loss) // 10
    at_min = low + int(np.argmin(loss[low:]))
    start = float(np.median(loss[low: 2 * low + 1]))
    if at_min - low >= 3 and loss[at_min] < (1 - MIN_FALL) * start:
        slope = np.gradient(loss, np.log10(np.asarray(lrs)))
        steepest = low + int(np.argmin(slope[low:at_min]))
        return float(lrs[steepest]), float(lrs[at_min]), "where the loss falls fastest"
    return float(lrs[at_min]) / 10, float(lrs[at_min]), (
        f"the loss did not fall by {MIN_FALL:.0%} over the range: the lowest loss's rate / 10")


def range_test_figure(result: RangeTest):
    """The smoothed loss against the rate (log axis), the suggestion marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    ax.plot(result.lrs, result.losses, color="0.8", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", lw=2, label="smoothed")
    if result.suggestion is not None:
        at = float(np.interp(np.log(result.suggestion), np.log(result.lrs), result.smoothed))
        ax.plot(result.suggestion, at, "o", color="tab:red", ms=8, label=f"suggested optim.lr={result.suggestion:.2g}")
    ax.set_xscale("log")
    finite = np.asarray(result.smoothed)
    if len(finite):
        ax.set_ylim(finite.min() * 0.9, min(finite.max(), finite[: max(len(finite) // 10, 1)].max() * 2) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend()
    return fig
