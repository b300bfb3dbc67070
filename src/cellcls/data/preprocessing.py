"""How an image becomes the model's input: the one owner of that recipe, for training, evaluation, export and serving.

Decoding (:mod:`cellcls.data.decode`) gives uint8 ``C x H x W`` at the model's size; :func:`to_unit` scales it to
[0, 1] (torchvision's ``ToDtype(scale=True)``); :class:`Normalize` standardises each channel with the run's
mean and std (torchvision's ``Normalize``). Training may augment between the two; everything else runs both.
The recipe is one type, :class:`Preprocessing`, stored in checkpoints and model cards as its plain dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.normalization import is_auto, is_preset, preset


def _numbers(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an input image, like timm's ``pretrained_cfg``: decode at ``image_size`` with
    ``channels`` (a DICOM file through ``window``), scale to [0, 1], standardise with ``mean``/``std``.

    Stored in checkpoints, model cards and exports as :meth:`to_dict` (plain numbers, so a checkpoint loads with
    ``weights_only=True``) and read back with :meth:`from_dict`, which fills what older files lack.
    """

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...] | None = None  # None: pixels / 255 only
    std: tuple[float, ...] | None = None
    window: tuple[float, float] | None = None  # DICOM only: [centre, width] replacing the file's own window
    resize: str = "bilinear"
    scale: str = "1/255"
    reference: dict[str, Any] = field(default_factory=dict)  # what the training images looked like (data.reference)

    REQUIRED: ClassVar[tuple[str, ...]] = ("image_size", "channels", "mean", "std")

    @classmethod
    def from_config(cls, ds: Any, mean: Any = None, std: Any = None) -> Preprocessing:
        """The recipe of the ``dataset`` section ``ds``; ``mean``/``std`` are given when the section says ``auto``
        (measured on the training split by :func:`cellcls.data.datamodule.build_data`); a preset's name becomes
        its numbers."""
        ds = typed(ds, DatasetConfig)
        channels = int(ds.channels)
        mean = ds.mean if mean is None and not is_auto(ds.mean) else mean
        std = ds.std if std is None and not is_auto(ds.std) else std
        if is_preset(mean):
            mean, std = preset(str(mean), channels)
        height, width = (int(s) for s in ds.image_size)
        window = ds.dicom_window
        return cls((height, width), channels, _numbers(mean), _numbers(std), _numbers(window))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], source: str = "the preprocessing") -> Preprocessing:
        """Read :meth:`to_dict`'s form back; a file written before ``window``, ``resize``, ``scale`` or
        ``reference`` existed gets their defaults, one lacking a required key is refused naming it."""
        missing = [k for k in cls.REQUIRED if k not in stored]
        if missing:
            raise ValueError(f"{source} is not usable: preprocessing lacks {missing}; use the run's other checkpoint "
                             "or train again")
        height, width = (int(s) for s in stored["image_size"])
        return cls((height, width), int(stored["channels"]), _numbers(stored["mean"]), _numbers(stored["std"]),
                   _numbers(stored.get("window")), str(stored.get("resize") or "bilinear"),  # type: ignore[arg-type]
                   str(stored.get("scale") or "1/255"), dict(stored.get("reference") or {}))

    @classmethod
    def from_input_spec(cls, spec: Mapping[str, Any]) -> Preprocessing:
        """The recipe an exported model's card states (:meth:`input_spec`'s words)."""
        return cls((int(spec["height"]), int(spec["width"])), int(spec["channels"]), _numbers(spec.get("mean")),
                   _numbers(spec.get("std")), _numbers(spec.get("dicom_window")),  # type: ignore[arg-type]
                   reference=dict(spec.get("training_range") or {}))

    def to_dict(self) -> dict[str, Any]:
        """The stored form: lists and numbers only."""
        def listed(v: tuple[float, ...] | None) -> list[float] | None:
            return None if v is None else list(v)

        return {"image_size": list(self.image_size), "channels": self.channels, "mean": listed(self.mean),
                "std": listed(self.std), "window": listed(self.window), "resize": self.resize, "scale": self.scale,
                "reference": dict(self.reference)}

    def with_statistics(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> Preprocessing:
        return replace(self, mean=_numbers(mean), std=_numbers(std))

    def with_reference(self, reference: dict[str, Any]) -> Preprocessing:
        return replace(self, reference=dict(reference))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one model input."""
        return (self.channels, *self.image_size)

    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    def input_spec(self) -> dict[str, Any]:
        """The recipe in words a client in another language can follow (the model card's ``input``)."""
        height, width = self.image_size
        return {
            "channels": self.channels,
            "color": "RGB" if self.channels == 3 else "L (greyscale)",
            "height": height,
            "width": width,
            "resize": "bilinear with antialiasing to height x width (Pillow Image.resize, BILINEAR), EXIF orientation applied",
            "scale": "pixel / 255",
            "dicom_window": list(self.window) if self.window is not None else None,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "training_range": self.reference or None,  # see cellcls.data.reference
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


def preprocess(images: torch.Tensor, preprocessing: Preprocessing, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (``N x C x H x W``, already at the model's size) -> the float input the model was trained on."""
    return preprocessing.normalize().to(device)(to_unit(images.to(device, non_blocking=True)))
