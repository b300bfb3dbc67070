"""How an image becomes the model's input: the one owner of that recipe, for training, evaluation, export and serving.

Decoding (:mod:`cellcls.data.decode`) gives uint8 ``C x H x W`` at the model's size; :func:`to_unit` scales it to
[0, 1] (torchvision's ``ToDtype(scale=True)``); :class:`Normalize` standardises each channel with the run's
mean and std (torchvision's ``Normalize``). Training may augment between the two; everything else runs both.
The recipe is stored in checkpoints and model cards as a plain dict (:func:`preprocessing_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from cellcls.data.normalization import is_preset, preset


def preprocessing_of(ds: DictConfig) -> dict[str, Any]:
    """What a model trained on ``ds`` expects of an input image. ``mean``/``std`` are ``"auto"`` until
    :func:`cellcls.data.datamodule.build_data` has measured the training split; a preset's name becomes its numbers."""

    def numbers(value: Any) -> list[float] | str | None:
        return value if value is None or isinstance(value, str) else [float(v) for v in value]

    mean, std = numbers(ds.mean), numbers(ds.std)
    if is_preset(mean):
        mean, std = preset(str(mean), int(ds.channels))
    return {
        "image_size": [int(s) for s in ds.image_size],
        "channels": int(ds.channels),
        "mean": mean,
        "std": std,
        "window": numbers(ds.get("dicom_window")),  # DICOM only: [centre, width] replacing the file's window
        "resize": "bilinear",
        "scale": "1/255",
    }


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], the same arithmetic as ``v2.ToDtype(torch.float32, scale=True)``."""
    return images.to(torch.float32).mul_(1.0 / 255)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel for ``C x H x W`` or ``N x C x H x W``; the identity without statistics."""

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.enabled = mean is not None and std is not None
        self.register_buffer("mean", torch.tensor(list(mean or [0.0]), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std or [1.0]), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # out of place: the exported graph and the per-image path must not modify their input
        return (x - self.mean) / self.std if self.enabled else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] (for showing what the model saw)."""
        return x * self.std.to(x.device) + self.mean.to(x.device) if self.enabled else x


def preprocess(images: torch.Tensor, preprocessing: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (``N x C x H x W``, already at the model's size) -> the float input the model was trained on."""
    normalize = Normalize(preprocessing.get("mean"), preprocessing.get("std")).to(device)
    return normalize(to_unit(images.to(device, non_blocking=True)))


def input_spec(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The recipe in words a client in another language can follow (the model card's ``input``)."""
    height, width = (int(v) for v in preprocessing["image_size"])
    channels = int(preprocessing["channels"])
    return {
        "channels": channels,
        "color": "RGB" if channels == 3 else "L (greyscale)",
        "height": height,
        "width": width,
        "resize": "bilinear with antialiasing to height x width (Pillow Image.resize, BILINEAR), EXIF orientation applied",
        "scale": "pixel / 255",
        "dicom_window": list(preprocessing["window"]) if preprocessing.get("window") is not None else None,
        "mean": list(preprocessing["mean"]) if preprocessing.get("mean") is not None else None,
        "std": list(preprocessing["std"]) if preprocessing.get("std") is not None else None,
        "training_range": preprocessing.get("reference") or None,  # see cellcls.data.reference
    }
