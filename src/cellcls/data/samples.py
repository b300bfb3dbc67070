"""A list of image files with their class indices and patient groups: what every layout scans a data set into."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


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
    # multi-label data (cellcls.data.findings): each image's finding vector, 1 / 0 / NaN (uncertain, left
    # out); ``labels`` then holds each image's stratum for splitting (0: no finding, k + 1: first finding k)
    targets: list[tuple[float, ...]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: Samples) -> Samples:
        groups = None if self.groups is None or other.groups is None else self.groups + other.groups
        targets = None if self.targets is None or other.targets is None else self.targets + other.targets
        return Samples(self.paths + other.paths, self.labels + other.labels, self.ignored + other.ignored, groups,
                       self.broken + other.broken, targets)

    def subset(self, indices: Sequence[int]) -> Samples:
        groups = None if self.groups is None else [self.groups[i] for i in indices]
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return Samples([self.paths[i] for i in indices], [self.labels[i] for i in indices], groups=groups,
                       targets=targets)

    @property
    def multilabel(self) -> bool:
        return self.targets is not None

    def training_targets(self) -> list[int] | torch.Tensor:
        """What a loader pairs with each image: the class index, or the ``N x K`` float finding vectors."""
        if self.targets is None:
            return self.labels
        return torch.tensor(self.targets, dtype=torch.float32).reshape(len(self.targets), -1)
