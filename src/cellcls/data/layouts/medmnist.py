"""The MedMNIST layout: a ``.npz`` archive with official splits (``dataset=medmnist dataset.file=<file>.npz``),
read from the PNG copy :func:`cellcls.data.medmnist.ensure_medmnist` keeps in the cache."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

from cellcls.config.schema import DatasetConfig
from cellcls.data.layouts.base import Layout, Scanned
from cellcls.data.medmnist import SPLIT_ARRAYS, class_names, ensure_medmnist, split_labels
from cellcls.data.samples import Samples
from cellcls.errors import DataError


class MedMNIST(Layout):
    """The MedMNIST v2 ``.npz`` files (``train_images``, ``train_labels``, ``val_*``, ``test_*``)."""

    what = "a MedMNIST archive (.npz)"

    def describes(self, ds: DatasetConfig) -> bool:
        return bool(ds.file)

    def holds(self, location: Path) -> bool:
        return location.is_file() and location.suffix.lower() == ".npz"

    def scan(self, ds: DatasetConfig, root: Path) -> Scanned:
        file = Path(str(ds.file)).expanduser()
        return Scanned(*_splits(file, root, ds.classes), root=root)

    def scan_location(self, ds: DatasetConfig, location: Path, classes: list[str]) -> Scanned:
        """Every image of the archive (all three splits) as ``data``, with the trained model's classes."""
        root = ensure_medmnist(location)
        found, splits = _splits(location, root, classes)
        if len(found) != len(classes):
            raise DataError(f"{location}: its labels name {len(found)} classes; the model has {len(classes)}")
        return Scanned(list(classes), {"data": functools.reduce(operator.add, splits.values())}, root=root)


def _splits(file: Path, root: Path, configured: list[str] | None) -> tuple[list[str], dict[str, Samples]]:
    labels = split_labels(root)
    classes = class_names(file, labels, configured)
    splits = {s: Samples([root / s / f"{i:06d}.png" for i in range(len(labels[s]))], list(labels[s]))
              for s in SPLIT_ARRAYS if labels[s]}
    return classes, splits
