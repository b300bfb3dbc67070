"""What every layout gives: :class:`Scanned`, a data set as its source lists it, and the :class:`Layout` interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from cellcls.config.schema import DatasetConfig
from cellcls.data.samples import Samples


@dataclass
class Scanned:
    """A data set as its source lists it, before any hold-out: classes, the images of each split it names, the
    non-image files passed over and the entries whose file does not exist (or cannot be read)."""

    classes: list[str]
    splits: dict[str, Samples]
    folders: dict[str, Path] = field(default_factory=dict)  # class-folder data sets: each split's folder
    ignored: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    root: Path | None = None  # what the images' relative paths are relative to


class Layout(ABC):
    """One way a download lays out its images."""

    what: str  # in words, for messages

    @abstractmethod
    def describes(self, ds: DatasetConfig) -> bool:
        """Whether the ``dataset`` section ``ds`` is a data set of this layout."""

    @abstractmethod
    def holds(self, location: Path) -> bool:
        """Whether a folder or file given on its own is of this layout."""

    @abstractmethod
    def scan(self, ds: DatasetConfig, root: Path) -> Scanned:
        """The images of each split, their classes and groups, of the data set ``ds`` under ``root``."""

    @abstractmethod
    def scan_location(self, ds: DatasetConfig, location: Path, classes: list[str]) -> Scanned:
        """Every image at ``location`` as one split, ``data``, with ``classes`` (a trained model's) and the groups
        ``ds`` (its training config's data set) says how to find."""
