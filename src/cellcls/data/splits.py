"""Seeded, stratified hold-out splits (by image or by patient) and their audit files."""

from __future__ import annotations

import csv
import math
import os
import logging
import re
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from cellcls.config.schema import DatasetConfig
from cellcls.data.dicom import header_values
from cellcls.data.findings import stratum
from cellcls.data.samples import Samples
from cellcls.errors import ConfigError, DataError
from cellcls.infra.run_folder import RunFolder, write_csv

log = logging.getLogger(__name__)


def group_ids(samples: Samples, pattern: str) -> list[str]:
    """The patient (or slide) of each file: the first capture group of ``pattern`` searched in its file name.

    A file the pattern does not match becomes a group of its own, with a warning.
    """
    regex = re.compile(pattern)
    groups, unmatched = [], 0
    for path in samples.paths:
        match = regex.search(path.name)
        if match is None:
            unmatched += 1
            groups.append(f"file:{path.name}")
        else:
            groups.append(match.group(1) if match.groups() else match.group(0))
    if unmatched and unmatched == len(groups):
        raise DataError(
            f"dataset.group_pattern {pattern!r} matches none of the {len(groups)} file names (e.g. "
            f"{samples.paths[0].name!r}); it must be a regex whose first group is the patient id in the name"
        )
    if unmatched:
        log.warning("%d file name(s) do not match dataset.group_pattern %r; each is its own group", unmatched, pattern)
    return groups


def group_source(ds: DatasetConfig) -> str | None:
    """The setting that says which patient (lesion, slide) each image belongs to, or None when none does."""
    for name, value in (("dataset.group_pattern", ds.group_pattern), ("dataset.group_tag", ds.group_tag),
                        ("dataset.table.group", ds.table.group if ds.table is not None else None)):
        if value:
            return f"{name}={value}"
    return None


def attach_groups(samples: Samples, ds: DatasetConfig) -> Samples:
    """``samples`` with each file's group: the first group of ``dataset.group_pattern`` in its name, or the DICOM
    header keyword ``dataset.group_tag`` (PatientID); kept as they are when already known (a table's group column)
    or when neither is set."""
    if samples.groups is not None:
        return samples
    if ds.group_pattern:
        samples.groups = group_ids(samples, str(ds.group_pattern))
    elif ds.group_tag:
        tag = str(ds.group_tag)
        values = header_values(samples.paths, tag)
        missing = sum(v is None for v in values)
        if missing:
            # counts only: header values are patient data and stay out of the logs
            log.warning("%d of %d file(s) have no readable DICOM %s (dataset.group_tag); each is its own group",
                        missing, len(values), tag)
        samples.groups = [f"file:{p.name}" if v is None else v for p, v in zip(samples.paths, values, strict=True)]
    return samples


def stratified_holdout(
    samples: Samples, fraction: float, seed: int, groups: list[str] | None = None
) -> tuple[Samples, Samples]:
    """Split ``samples`` into (kept, held out), about ``fraction`` held out, class proportions preserved.

    With ``groups`` no group (patient) is on both sides: the held-out part is one fold of a seeded
    ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds, so its size is close to, not exactly, ``fraction``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"a hold-out fraction (dataset.val_fraction / test_fraction) must be in (0, 1), got {fraction}")
    indices = np.arange(len(samples))
    if groups is None:
        try:
            kept, held = train_test_split(indices, test_size=fraction, stratify=samples.labels, random_state=seed)
        except ValueError as exc:  # sklearn: a class too small to stratify
            counts = np.bincount(np.asarray(samples.labels))
            raise DataError(f"cannot hold out {fraction:.0%} stratified by class: the training images per class are "
                            f"{counts.tolist()} (each class needs at least 2, and enough for both sides)") from exc
    else:
        n_splits = max(2, round(1 / fraction))
        n_groups = len(set(groups))
        if n_groups < n_splits:
            raise DataError(
                f"cannot hold out {fraction:.0%} by group: only {n_groups} groups (patients or near-duplicate "
                f"clusters) were found (need at least {n_splits}); use dataset.split_by=image or a larger fraction"
            )
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        kept, held = next(folds.split(indices, samples.labels, groups))
    return samples.subset(sorted(kept)), samples.subset(sorted(held))


def cross_validation_fold(
    samples: Samples, folds: int, fold: int, seed: int, classes: list[str], groups: list[str] | None = None
) -> tuple[Samples, Samples]:
    """Fold ``fold`` of a seeded, stratified (and, with ``groups``, grouped) ``folds``-fold split: (rest, fold).

    Every image is in exactly one fold; no group is in two. A fold that lacks a class is an error: its scores
    would not measure that class."""
    labels = np.asarray(samples.labels)
    keys = groups if groups is not None else [str(i) for i in range(len(samples))]
    if len(set(keys)) < folds:
        raise DataError(f"cv.folds={folds}: only {len(set(keys))} groups to spread over the folds; use fewer folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # sklearn warns when a class has fewer groups than folds; checked below
        warnings.simplefilter("ignore", UserWarning)
        rest, held = list(splitter.split(np.arange(len(samples)), labels, keys))[fold]
    missing = [c for i, c in enumerate(classes) if not (labels[held] == i).any()]
    if missing:
        raise DataError(f"cross-validation fold {fold + 1} of {folds} holds no image of class(es) {missing} (too few "
                        f"images or groups of that class for {folds} folds); use fewer folds (cv.folds)")
    return samples.subset(sorted(rest)), samples.subset(sorted(held))


def write_split_lists(run: RunFolder, splits: dict[str, Samples], root: Path, classes: list[str]) -> None:
    """Write ``splits/<split>.csv`` (file relative to the data root, class) so a split can be audited and reused."""
    for name, samples in splits.items():
        if samples.targets is not None:  # one column per finding: 1, 0, blank for uncertain
            rows = [{"file": relative_path(path, root),
                     **{f: "" if math.isnan(v) else str(int(v)) for f, v in zip(classes, target, strict=True)}}
                    for path, target in zip(samples.paths, samples.targets, strict=True)]
            write_csv(run.split_list(name), rows, columns=("file", *classes))
            continue
        rows = [{"file": relative_path(path, root), "class": classes[label]}
                for path, label in zip(samples.paths, samples.labels, strict=True)]
        write_csv(run.split_list(name), rows, columns=("file", "class"))


def read_split_lists(run: RunFolder, root: Path, classes: list[str]) -> dict[str, Samples]:
    """The splits a run trained, validated and tested on, from its ``splits/<split>.csv`` files."""
    splits = {}
    for name in ("train", "val", "test"):
        file = run.split_list(name)
        if not file.is_file():
            continue
        with file.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "class" not in rows[0]:  # a multi-label run's list: one column per finding
            missing = [c for c in classes if c not in rows[0]]
            if missing:
                raise DataError(f"{file}: no column for finding(s) {missing} of the run")
            targets = [tuple(math.nan if r[c] == "" else float(r[c]) for c in classes) for r in rows]
        unknown = sorted({r.get("class", classes[0]) for r in rows} - set(classes))
        if unknown:
            raise DataError(f"{file}: class(es) {unknown} are not among the run's classes {classes}")
        paths = [Path(os.path.normpath(root / r["file"])) for r in rows]
        outside = [(i + 2, r["file"]) for i, (r, p) in enumerate(zip(rows, paths, strict=True)) if not p.is_relative_to(root)]
        if outside:  # a tampered list must not make cellcls read files elsewhere on the machine
            line, where = outside[0]
            raise DataError(f"{file} line {line}: {where!r} is outside the data root {root} ({len(outside)} such "
                            "row(s)); a split list names files inside the data set")
        if rows and "class" not in rows[0]:
            splits[name] = Samples(paths, [stratum(t) for t in targets], targets=targets)
            continue
        splits[name] = Samples(paths, [classes.index(r["class"]) for r in rows])
    if "train" not in splits:
        raise DataError(f"{run.split_list('train')} not found: is {run.root} a cellcls run folder?")
    return splits


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to the data root (as written in split lists and audits), or whole when outside it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
