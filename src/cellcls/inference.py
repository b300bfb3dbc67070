"""Loading a trained model from its checkpoint alone, and running it over images."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from cellcls.checkpoint import load_checkpoint
from cellcls.hardware import resolve_device
from cellcls.losses import ClassificationLoss, probabilities
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
    metrics: dict[str, Any] = field(default_factory=dict)
    supports_cam = True

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

    @property
    def card(self) -> dict[str, Any]:
        """What a person or a client needs to know of the model: name, classes, input, metrics (JSON-ready)."""
        spec = OmegaConf.to_container(self.config.model, resolve=True) if "model" in self.config else {}
        return {
            "model": str(spec.get("name", type(self.model).__name__)),
            "dataset": str(self.config.dataset.name) if "dataset" in self.config else None,
            "classes": list(self.classes),
            "input": input_spec(self.preprocessing),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "epoch": self.epoch,
            "checkpoint": str(self.path),
            "metrics": self.metrics,
        }


def load_model(location: str | Path, device: str = "auto") -> LoadedModel:
    """The model of a checkpoint file, or of a run folder's ``checkpoints/best.pt``."""
    ckpt = load_checkpoint(location, name="best.pt")
    dev = resolve_device(device, setting="device")
    prep = ckpt["preprocessing"]
    model = build_model(ckpt["model_spec"], prep["channels"], len(ckpt["classes"]), prep["image_size"])
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    path = Path(ckpt["path"])
    return LoadedModel(model, list(ckpt["classes"]), prep, OmegaConf.create(ckpt["config"]), path,
                       int(ckpt["epoch"]), dev, checkpoint_metrics(ckpt, path))


def input_spec(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """How images are turned into the model's input, in words a client in another language can follow."""
    height, width = (int(v) for v in preprocessing["image_size"])
    channels = int(preprocessing["channels"])
    return {
        "channels": channels,
        "color": "RGB" if channels == 3 else "L (greyscale)",
        "height": height,
        "width": width,
        "resize": "bilinear with antialiasing to height x width (Pillow Image.resize, BILINEAR), EXIF orientation applied",
        "scale": "pixel / 255",
        "mean": list(preprocessing["mean"]) if preprocessing.get("mean") is not None else None,
        "std": list(preprocessing["std"]) if preprocessing.get("std") is not None else None,
    }


def checkpoint_metrics(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """Validation metrics of the checkpoint's epoch, and the run's test metrics when they belong to it."""
    rows = ckpt.get("history") or []
    row = next((r for r in rows if int(r.get("epoch", -1)) == int(ckpt["epoch"])), {})
    out: dict[str, Any] = {"monitor": (ckpt.get("monitor") or {}).get("metric")}
    val = {k.removeprefix("val_"): float(v) for k, v in row.items() if k.startswith("val_")}
    if val:
        out["val"] = val
    test_file = (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "test_metrics.json"
    if test_file.is_file():
        test = json.loads(test_file.read_text())
        if int(test.get("epoch", -1)) == int(ckpt["epoch"]):
            out["test"] = {k: test[k] for k in ("accuracy", "balanced_accuracy", "loss", "num_images") if k in test}
    return out


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
