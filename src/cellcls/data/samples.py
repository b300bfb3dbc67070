"""A list of image files with their class indices and patient groups: what every layout scans a data set into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


SPLITS = ("train", "val", "test")  # the splits a data set is divided into, in this order


@dataclass
class Samples:
    """Image files and their class indices, plus what was passed over while scanning.

    ``groups`` (when known) is each file's patient, lesion or slide: from the file name (``dataset.group_pattern``),
    a DICOM header (``dataset.group_tag``) or a table column (``dataset.table.group``); see
    :func:`cellcls.data.splits.attach_groups`."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    groups: list[str] | None = None
    broken: list[tuple[str, str]] = field(default_factory=list)  # links to nothing: (file, why), listed as skipped

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: Samples) -> Samples:
        groups = None if self.groups is None or other.groups is None else self.groups + other.groups
        return Samples(self.paths + other.paths, self.labels + other.labels, self.ignored + other.ignored, groups,
                       self.broken + other.broken)

    def subset(self, indices: Sequence[int]) -> Samples:
        groups = None if self.groups is None else [self.groups[i] for i in indices]
        return Samples([self.paths[i] for i in indices], [self.labels[i] for i in indices], groups=groups)
