"""The layout registry: how a data set's files name their splits and classes, one class per layout.

Every reader of a data set, training, ``evaluate data=``, ``inspect`` and the audit, goes through :func:`scan` (a
configured data set) or :func:`scan_location` (a folder or table given to ``evaluate``), so a layout is added in one
place: a module here with a :class:`Layout` subclass, its entry in :data:`LAYOUTS` (or :func:`register_layout`
from one's own code), and its ``configs/dataset`` YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.layouts.base import Layout, Scanned
from cellcls.data.layouts.folders import ClassFolders
from cellcls.data.layouts.medmnist import MedMNIST
from cellcls.data.layouts.table import Table
from cellcls.errors import DataError

# first match wins: a `dataset.table` section makes a table data set, `dataset.file` a MedMNIST archive, anything
# else is class folders
LAYOUTS: list[Layout] = [Table(), MedMNIST(), ClassFolders()]

__all__ = ["LAYOUTS", "Layout", "Scanned", "layout_at", "layout_of", "register_layout", "scan", "scan_location"]


def register_layout(layout: Layout) -> Layout:
    """Put a layout of one's own first in line (before the built-in ones, which claim every other data set)."""
    LAYOUTS.insert(0, layout)
    return layout


def layout_of(ds: DatasetConfig | Any) -> Layout:
    """The layout the ``dataset`` section ``ds`` describes."""
    ds = typed(ds, DatasetConfig)
    return next(layout for layout in LAYOUTS if layout.describes(ds))


def layout_at(location: Path) -> Layout:
    """The layout of a folder or file given on its own (``evaluate data=<location>``)."""
    for layout in LAYOUTS:
        if layout.holds(location):
            return layout
    raise DataError(f"{location}: neither a folder of class folders, a table nor a MedMNIST archive "
                    f"({', '.join(layout.what for layout in LAYOUTS)})")


def scan(ds: DatasetConfig | Any, root: Path) -> Scanned:
    """The images of each split the data set's own layout names, with their groups."""
    ds = typed(ds, DatasetConfig)
    return layout_of(ds).scan(ds, root)


def scan_location(ds: DatasetConfig | Any, location: Path, classes: list[str]) -> Scanned:
    """Every image at ``location`` as one split, ``data``, labelled with ``classes`` (a trained model's)."""
    return layout_at(location).scan_location(typed(ds, DatasetConfig), location, classes)
