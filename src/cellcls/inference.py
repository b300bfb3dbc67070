"""Loading a trained model from its checkpoint alone, and running it over images."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from cellcls.checkpoint import load_checkpoint
from cellcls.losses import ClassificationLoss, probabilities
from cellcls.hardware import resolve_device
from cellcls.models import build_model, l2_penalty


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to feed it: classes, preprocessing, the training config."""

    model: nn.Module
    classes: list[str]
    preprocessing: dict[str, Any]
    config: DictConfig
    path: Path
    epoch: int
    device: torch.device

    @property
    def run_dir(self) -> Path:
        """The run folder of a checkpoint stored as ``<run>/checkpoints/<name>.pt``."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x C x H x W`` (already resized) -> the float input the model was trained on."""
        x = images.to(self.device, non_blocking=True).float() / 255.0
        prep = self.preprocessing
        if prep.get("mean") is not None:
            mean = torch.tensor(prep["mean"], device=self.device).view(1, -1, 1, 1)
            std = torch.tensor(prep["std"], device=self.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``N x num_classes`` for uint8 images."""
        return probabilities(self.model(self.prepare(images))).cpu().numpy()


def load_model(location: str | Path, device: str = "auto") -> LoadedModel:
    """The model of a checkpoint file, or of a run folder's ``checkpoints/best.pt``."""
    ckpt = load_checkpoint(location, name="best.pt")
    dev = resolve_device(device, setting="device")
    prep = ckpt["preprocessing"]
    model = build_model(ckpt["model_spec"], prep["channels"], len(ckpt["classes"]), prep["image_size"])
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    return LoadedModel(model, list(ckpt["classes"]), prep, OmegaConf.create(ckpt["config"]), Path(ckpt["path"]),
                       int(ckpt["epoch"]), dev)


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and targets for every batch of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for images, labels in loader:
        if labels.numel() == 0:
            continue
        with autocast:
            out = model(images.to(device, non_blocking=True, memory_format=memory_format))
        logits.append(out.float().cpu())
        targets.append(labels.cpu())
    return torch.cat(logits), torch.cat(targets)


def mean_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Unweighted loss over all cases plus the model's L2 terms: the val/test loss Keras reports."""
    loss = ClassificationLoss(logits.shape[1])(logits, targets)
    with torch.no_grad():
        return float(loss) + float(l2_penalty(model))
