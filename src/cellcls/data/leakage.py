"""Which images of a validation or test split share a patient, a group or a near-duplicate with training.

The groups are the samples' own (patients, lesions, slides: from the file names, DICOM headers or a table column; see
:func:`cellcls.data.splits.attach_groups`) and the near-duplicate
clusters of :mod:`cellcls.data.duplicates` (copies of one original photo). A run logs one warning per leak at start,
``inspect`` and the audit print them; :func:`group_labels` is also what the grouped hold-outs split on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from cellcls.config.schema import DatasetConfig, typed
from cellcls.data.duplicates import cached_duplicates
from cellcls.data.samples import Samples
from cellcls.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leak:
    """``images`` of ``split`` (of ``total``) share one of ``groups`` groups of ``kind`` with the training split."""

    split: str
    kind: str  # "patient" (the samples' groups) or "near-duplicate"
    images: int
    total: int
    groups: int

    def message(self) -> str:
        what = "a patient/group" if self.kind == "patient" else "a near-duplicate cluster"
        return (f"{self.images} of {self.total} {self.split} images ({self.images / self.total:.0%}) share {what} "
                f"with the training split ({self.groups} shared); their scores are optimistic")


def duplicate_clusters(splits: dict[str, Samples], ds: DatasetConfig, progress: bool = True) -> dict[Path, str]:
    """The near-duplicate cluster of every file of ``splits``, found over all of them together (cached)."""
    # sorted: the same files give the same cache entry, however they are split
    paths = sorted({p for samples in splits.values() for p in samples.paths})
    found = cached_duplicates(paths, ds.duplicates, progress)
    return {path: f"cluster:{int(c)}" for path, c in zip(paths, found.cluster, strict=True)}


def group_labels(samples: Samples, ds: DatasetConfig, clusters: dict[Path, str] | None) -> list[str] | None:
    """The group of each sample that ``dataset.split_by`` keeps on one side of a split (None: by image)."""
    if ds.split_by == "patient":
        if samples.groups is None:
            raise DataError("dataset.split_by=patient: the images have no patient groups; set dataset.group_pattern, "
                            "dataset.group_tag or dataset.table.group")
        return samples.groups
    if ds.split_by == "duplicates":
        assert clusters is not None, "split_by=duplicates needs the clusters"
        return [clusters[p] for p in samples.paths]
    return None


def interval_groups(ds: DatasetConfig | Any, samples: Samples, splits: dict[str, Samples]) -> list[str] | None:
    """The groups a split's confidence intervals resample: patients (the samples' groups, or those of the same files
    in ``splits``), else near-duplicate clusters when the data set is split by them; None when images are independent
    as far as cellcls knows."""
    ds = typed(ds, DatasetConfig)
    if samples.groups is not None:
        return samples.groups
    known = {p: g for s in splits.values() if s.groups is not None for p, g in zip(s.paths, s.groups, strict=True)}
    if known:
        return [known.get(p, f"file:{p.name}") for p in samples.paths]
    if ds.split_by == "duplicates":
        clusters = duplicate_clusters(splits, ds, progress=False)
        return [clusters[p] for p in samples.paths]
    return None


def find_leaks(splits: dict[str, Samples], ds: DatasetConfig, clusters: dict[Path, str] | None) -> list[Leak]:
    """Leaks of each non-training split into training, by patient (when the samples have groups) and by
    near-duplicate cluster (when ``clusters`` are known)."""
    kinds: dict[str, dict[str, list[str]]] = {}
    if all(samples.groups is not None for samples in splits.values()):
        kinds["patient"] = {name: list(samples.groups or []) for name, samples in splits.items()}
    if clusters is not None:
        kinds["near-duplicate"] = {name: [clusters[p] for p in samples.paths] for name, samples in splits.items()}
    leaks = []
    for kind, groups in kinds.items():
        train = set(groups["train"])
        for name, ids in groups.items():
            shared = [g for g in ids if g in train]
            if name != "train" and shared:
                leaks.append(Leak(name, kind, len(shared), len(ids), len(set(shared))))
    return leaks


def warn_leaks(leaks: list[Leak]) -> None:
    for leak in leaks:
        log.warning("split leakage: %s", leak.message())
