"""Per-epoch metrics to ``metrics.csv`` and, when enabled, to TensorBoard."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision.utils import make_grid

# metrics.csv column -> TensorBoard tag; train and val share a chart in TensorBoard
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "val_balanced_accuracy": "balanced_accuracy/val",
    "lr": "lr",
    "epoch_time_s": "time/epoch_s",
}


class RunLogger:
    """Writes one ``metrics.csv`` row per epoch and mirrors the values to TensorBoard."""

    def __init__(
        self, run_dir: Path, tensorboard: bool = True, history: list[dict[str, Any]] | None = None, enabled: bool = True
    ) -> None:
        self.csv_path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = list(history or [])
        self.enabled = enabled  # False on non-zero torchrun ranks: they keep the history but write nothing
        self.writer = None
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if self.rows:
            self._write_csv()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.rows.append({"epoch": epoch, **metrics})
        self._write_csv()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(TAGS.get(key, key), value, epoch)
            self.writer.flush()

    def _write_csv(self) -> None:
        if not self.enabled:
            return
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)

    def log_images(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        """A grid of images in [0, 1] (N x C x H x W)."""
        if self.writer is not None:
            self.writer.add_image(tag, make_grid(images.clamp(0, 1), nrow=8, padding=2), step)

    def log_image_hwc(self, tag: str, image, step: int = 0) -> None:
        """One ``H x W x 3`` uint8 picture (a saved figure)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def log_text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Hyper-parameters and final metrics for TensorBoard's HParams view, in this run's own event file."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        experiment, start, end = hparams_summary(clean, dict(metrics))
        file_writer = self.writer._get_file_writer()
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
