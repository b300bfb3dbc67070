"""Batches of a decoded-cache split, prepared on the training device rather than image by image on the CPU.

Rows are gathered from the memory-mapped uint8 cache by a background thread (into pinned memory on CUDA) while
the current batch trains; the uint8 batch is copied without blocking (on its own CUDA stream, one batch ahead),
then converted, augmented as a batch (:class:`~cellcls.data.batch_augment.BatchAugment`) and normalised on the
device. Conversion and normalisation are the same operations as torchvision's ``ToDtype(scale=True)`` and
``Normalize``, so without augmentation the batches equal the per-image path's bit for bit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from cellcls.data.batch_augment import BatchAugment
from cellcls.data.preprocessing import Normalize, to_unit


class DeviceBatches:
    """An iterable of ``(images, labels)`` on ``device``: float images, normalised and (for training) augmented."""

    def __init__(
        self,
        file: Path,
        rows: Sequence[int],
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        device: torch.device,
        augment: BatchAugment | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        prefetch: int = 2,
        sampler: Sampler[int] | None = None,
        drop_last: bool = False,
    ) -> None:
        self.file = file
        self.rows = np.asarray(rows, dtype=np.int64)
        # class indices, or (multi-label) N x K float finding vectors
        self.labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(list(labels), dtype=torch.long)
        self.batch_size = batch_size
        self.device = device
        self.augment = augment if augment is not None and augment.settings.any else None
        self.normalize = Normalize(mean, std).to(device)
        self.prefetch = prefetch
        self.drop_last = drop_last
        # a given sampler (a DistributedSampler under torchrun) decides the order, else shuffle does
        self.sampler: Sampler[int] = sampler or (RandomSampler(range(len(self.rows)), generator=generator) if shuffle
                                                 else SequentialSampler(range(len(self.rows))))
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(BatchSampler(self.sampler, self.batch_size, drop_last=self.drop_last))

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.file, mmap_mode="r")
        return self._pixels

    def _gather(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 rows of ``indices`` (pinned on CUDA, so the copy to the GPU can be asynchronous)."""
        rows = self.rows[indices]
        shape = (len(rows), *self.pixels.shape[1:])
        buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        np.take(self.pixels, rows, axis=0, out=buf.numpy())
        return buf, self.labels[indices]

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Gathered batches, produced by a thread ``prefetch`` batches ahead of the consumer."""
        batches = list(BatchSampler(self.sampler, self.batch_size, drop_last=self.drop_last))
        if self.prefetch <= 0:
            yield from (self._gather(b) for b in batches)
            return
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for b in batches:
                    if stop.is_set():
                        return
                    out.put(self._gather(b))
                out.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                out.put(exc)

        worker = threading.Thread(target=produce, name="cellcls-gather", daemon=True)
        worker.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def prepare(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 on the device -> the model's float input (ToDtype(scale=True), augmentation, Normalize)."""
        x = to_unit(images)
        if self.augment is not None:
            x = self.augment(x, generator)
        return self.normalize(x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # the epoch's augmentation stream, seeded from torch's global generator (which the trainer seeds per
        # epoch): reproducible, and independent of whichever thread draws from it
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        if self.device.type != "cuda":
            # finished here, not in the gathering thread: on the CPU both would compete for the same cores
            for images, labels in self._host_batches():
                yield self.prepare(images, generator), labels
            return
        # CUDA: copy batch i+1 on a side stream while batch i computes on the current stream
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        pending = None
        for images, labels in self._host_batches():
            with torch.cuda.stream(stream):
                copied = (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(stream)
            if pending is not None:
                yield self._ready(*pending, current, generator)
            pending = (*copied, event)
        if pending is not None:
            yield self._ready(*pending, current, generator)

    def _ready(self, images: torch.Tensor, labels: torch.Tensor, copied: torch.cuda.Event, current: torch.cuda.Stream,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        current.wait_event(copied)  # this batch's copy only, not the next one's
        images.record_stream(current)
        labels.record_stream(current)
        return self.prepare(images, generator), labels
