"""A map-style data set of image files, decoded with Pillow into fixed-size uint8 tensors."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from cellcls.data.decode import decode_image
from cellcls.data.samples import Samples
from cellcls.errors import DataError


def load_image(
    source: Path | BinaryIO, channels: int, size: Sequence[int], name: str | None = None, limit: int | None = None,
    window: Sequence[float] | None = None,
) -> torch.Tensor:
    """:func:`cellcls.data.decode.decode_image` as a ``channels x H x W`` uint8 tensor."""
    return torch.from_numpy(decode_image(source, channels, size, name, limit, window))


class CachedImages(Dataset):
    """(image, label) pairs read from a decoded-cache file (memory-mapped, opened lazily in each worker)."""

    def __init__(
        self,
        file: Path,
        rows: Sequence[int],
        labels: Sequence[int] | torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.file = file
        self.rows = list(rows)
        self.labels = labels if isinstance(labels, torch.Tensor) else list(labels)
        self.transform = transform
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # workers map the file themselves instead of copying it

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._pixels is None:
            self._pixels = np.load(self.file, mmap_mode="r")
        image = torch.from_numpy(np.array(self._pixels[self.rows[index]]))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class ImageFiles(Dataset):
    """(image, label) pairs from ``samples``; ``transform`` maps the uint8 tensor to the model's input."""

    def __init__(
        self,
        samples: Samples,
        channels: int,
        image_size: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        window: Sequence[float] | None = None,
    ) -> None:
        self.samples = samples
        self.window = window
        self.channels = channels
        self.image_size = tuple(int(s) for s in image_size)
        self.transform = transform
        self.targets = samples.training_targets()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            image = load_image(self.samples.paths[index], self.channels, self.image_size, window=self.window)
        except DataError as exc:  # one bad file must not end a long run; skip_none_collate drops it
            warnings.warn(f"skipping unreadable image: {exc}", stacklevel=1)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def skip_none_collate(batch: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Default collation without the samples that failed to decode."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(kept)
