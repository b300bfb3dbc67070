"""One training epoch and one evaluation pass, as plain functions with explicit arguments (the style of
torchvision's classification reference), so scripts and benchmarks call exactly what ``fit`` calls."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from cellcls.evaluation.inference import Scores, run_inference, score
from cellcls.models import l2_penalty
from cellcls.models.heads import predicted_labels
from cellcls.training import distributed
from cellcls.training.runtime import Runtime

BatchHook = Callable[[int, torch.Tensor], None]


def train_one_epoch(
    model: nn.Module,
    net: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    gradient_clip: float | None = None,
    on_batch: BatchHook | None = None,
    progress: str | None = None,
) -> tuple[float, float]:
    """Train ``model`` (``net`` itself, or its DDP/compiled wrapper) over ``loader`` once; returns the mean loss
    and accuracy over all processes. ``on_batch(step, images)`` sees each batch before the step."""
    model.train()
    device = runtime.device
    # running sums stay on the device: reading them every step would stall the GPU's queue of work
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = tqdm(loader, desc=progress, leave=False, disable=progress is None, mininterval=0.5, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if targets.numel() == 0:  # every image of the batch failed to decode (uncached mode)
            continue
        if on_batch is not None:
            on_batch(step, images)
        images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
        targets = targets.to(device, non_blocking=True)
        with runtime.autocast():
            logits = model(images)
            loss = loss_fn(logits, targets) + l2_penalty(net)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if gradient_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), float(gradient_clip))
        scaler.step(optimizer)
        scaler.update()
        n = targets.shape[0]
        total_loss += loss.detach().double() * n
        correct += (predicted_labels(logits.detach()) == targets).sum()
        seen += n
        if progress is not None and step % 20 == 0:
            bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.4f}", refresh=False)
    bar.close()
    total, right, count = distributed.all_reduce_sum([float(total_loss), float(correct), float(seen)])
    return total / count, right / count


def evaluate(net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime) -> Scores:
    """Loss (unweighted, with the model's L2 terms as Keras reports it), accuracy, balanced accuracy, ROC-AUC."""
    logits, targets = run_inference(net, loader, runtime.device, runtime.amp_dtype, runtime.memory_format)
    return score(net, logits, targets)
