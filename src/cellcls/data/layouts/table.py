"""Data sets listed in a table (``dataset=csv``): a CSV or Parquet file with one row per image.

Each row gives an image path (relative to ``dataset.root``, or built from columns by ``path_template``), a label
(mapped to a class by ``label_map``), and optionally a group (patient, lesion) and a split. Rows that name an unknown
label or split, repeat an image, leave the images root or are empty are refused all at once, each named by its line;
rows whose file does not exist are skipped and listed, as unreadable images are.
"""

from __future__ import annotations

import csv
import functools
import logging
import operator
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cellcls.config.schema import DatasetConfig, TableConfig
from cellcls.data.layouts.base import Layout, Scanned
from cellcls.data.findings import finding_vectors, split_findings, stratum
from cellcls.data.layouts.folders import class_names, split_names
from cellcls.data.samples import SPLITS, Samples
from cellcls.data.splits import attach_groups
from cellcls.errors import ConfigError, DataError, nearest

log = logging.getLogger(__name__)
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
TABLE_SUFFIXES = frozenset({".csv", ".tsv"}) | PARQUET_SUFFIXES
SHOWN = 20  # bad rows listed in one error; the rest are counted


@dataclass
class TableData:
    """What a table holds: its classes, the images of each split it names, and the rows passed over."""

    classes: list[str]
    splits: dict[str, Samples]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (path, why) for rows whose file does not exist
    dropped: int = 0  # rows whose label label_map maps to null


def is_table(path: Path) -> bool:
    """Whether ``path`` is a file cellcls reads as a table (by extension)."""
    return path.suffix.lower() in TABLE_SUFFIXES and path.is_file()


def table_file(setting: str, root: Path) -> Path:
    """``dataset.table.file``: absolute, relative to the working folder, or relative to the images root."""
    given = Path(setting).expanduser()
    for candidate in (given, root / given):
        if candidate.is_file():
            return candidate.resolve()
    raise DataError(f"dataset.table.file={setting}: no such file (looked in the working folder and in {root})")


def read_rows(file: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    """The column names and ``(where, row)`` pairs of a CSV/TSV (``line N``, as an editor numbers it) or Parquet
    (``row N``, 0-based as pandas shows it) file; every value as text, empty for missing."""
    if file.suffix.lower() in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{file}: reading Parquet tables needs pyarrow (pip install 'cellcls[parquet]')") from exc
        try:
            table = pq.read_table(file)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc
        columns = list(table.column_names)
        return columns, ((f"row {i}", {k: "" if v is None else str(v) for k, v in r.items()})
                         for i, r in enumerate(table.to_pylist()))
    fh = file.open(newline="", encoding="utf-8-sig")  # -sig: Excel writes a byte-order mark
    reader = csv.DictReader(fh, delimiter="\t" if file.suffix.lower() == ".tsv" else ",")
    try:
        columns = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        fh.close()
        raise DataError(f"{file}: not a readable UTF-8 CSV file ({exc})") from exc

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        with fh:
            try:
                last = reader.line_num
                for row in reader:
                    start, last = last + 1, reader.line_num
                    if last > start and any("\n" in (v or "") for v in row.values() if isinstance(v, str)):
                        # an image table has no multi-line values: a quote opened here swallowed the lines after it
                        raise DataError(f"{file} line {start}: a quote (\") opened on this line is not closed until "
                                        f"line {last} (the end of the file, or the next quote); close it or remove it")
                    yield f"line {last}", {k: (v or "").strip() for k, v in row.items() if k is not None}
            except (UnicodeDecodeError, csv.Error) as exc:
                raise DataError(f"{file} line {reader.line_num}: cannot be read ({exc})") from exc

    return columns, rows()


def table_paths(file: Path, column: str = "path", template: str | None = None) -> list[Path]:
    """The image paths a table lists (its ``column``, or ``template`` filled from its columns), relative to the
    table's folder; what ``predict input=<table>`` predicts."""
    columns, rows = read_rows(file)
    _require_columns(file, columns, {f"path_template ({{{c}}})": c for c in _template_columns(template)}
                     if template else {"path": column})
    paths = []
    for where, row in rows:
        value = template.format(**row) if template else row[column]
        if not value:
            raise DataError(f"{file} {where}: empty path")
        paths.append(Path(os.path.normpath(file.parent / value)))
    return paths


def _require_columns(file: Path, columns: Sequence[str], wanted: Mapping[str, str | None]) -> None:
    for setting, column in wanted.items():
        if column and column not in columns:
            raise DataError(f"{file}: no column {column!r} (dataset.table.{setting}){nearest(column, columns)}; "
                            f"the table's columns: {', '.join(columns)}")


def _template_columns(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


# where (line), path, label (a class name; for multi-label rows the findings or finding-column values), group, split
Entry = tuple[str, Path, Any, "str | None", str]


def load_table(ds: DatasetConfig, root: Path) -> TableData:
    """The images a ``dataset.table`` lists under ``root``, by split (all in ``train`` without a split column)."""
    t = ds.table
    assert t is not None, "a table data set has a dataset.table section"
    if not t.file:
        raise ConfigError("dataset.table.file is not set: give the CSV or Parquet file listing the images")
    file = table_file(str(t.file), root)
    columns, rows = read_rows(file)
    template = str(t.path_template) if t.path_template else None
    multi = bool(t.label_sep or t.finding_columns)
    wanted: dict[str, str | None] = {"group": t.group, "split": t.split}
    if t.finding_columns:
        wanted.update({f"finding_columns ({c})": str(c) for c in t.finding_columns})
    else:
        wanted["label"] = str(t.label)
    if template:
        wanted.update({f"path_template ({{{c}}})": c for c in _template_columns(template)})
    else:
        wanted["path"] = str(t.path)
    _require_columns(file, columns, wanted)
    label_map: dict[str, Any] = {str(k): v for k, v in (t.label_map or {}).items()}
    split_of = {n.lower(): split for split, names in split_names(ds.splits).items() for n in names}
    errors: list[str] = []
    entries, dropped = _entries(rows, t, template, label_map, split_of, root, errors)
    if multi:
        classes, vectors = finding_vectors([e[2] for e in entries], [e[0] for e in entries],  # type: ignore[misc]
                                           [str(c) for c in ds.classes] if ds.classes else None, str(t.uncertain),
                                           errors)
        coded = [(stratum(v), v) for v in vectors]
    else:
        classes = _classes(ds, label_map, entries)
        index = {name: i for i, c in enumerate(classes) for name in class_names(c, ds.class_aliases or {})}
        coded = []
        for where, _, label, _, _ in entries:  # labels are matched case-insensitively, aliases included
            if str(label).lower() not in index:
                errors.append(f"{where}: label {label!r} is not a class ({', '.join(classes)}); map it with "
                              "dataset.table.label_map (a label mapped to null drops its rows)")
                continue
            coded.append((index[str(label).lower()], None))
    if errors:
        more = f"\n  ... and {len(errors) - SHOWN} more" if len(errors) > SHOWN else ""
        raise DataError(f"{file}: {len(errors)} row(s) cannot be used:\n  " + "\n  ".join(errors[:SHOWN]) + more)
    if len(classes) < (1 if multi else 2):
        raise DataError(f"{file}: the labels name {len(classes)} class(es) {classes}; a classifier needs at least 2")
    splits, missing = _by_split(entries, coded, bool(t.group), file, root)
    if "train" not in splits:
        raise DataError(f"{file}: no training images (rows whose file exists, with split "
                        f"{', '.join(n for n, s in split_of.items() if s == 'train')})" if t.split else
                        f"{file}: none of its {len(entries)} image file(s) exist under dataset.root={root}")
    return TableData(classes, splits, missing, dropped)


def _classes(ds: DatasetConfig, label_map: dict[str, Any], entries: list[Entry]) -> list[str]:
    if ds.classes:
        return [str(c) for c in ds.classes]
    if label_map:  # the map names the classes; a raw label outside it must be one of them
        return sorted({str(v) for v in label_map.values() if v is not None})
    return sorted({str(e[2]) for e in entries})


def _entries(rows: Iterator[tuple[str, dict[str, str]]], t: TableConfig, template: str | None,
             label_map: dict[str, Any], split_of: dict[str, str], root: Path, errors: list[str]) -> tuple[list[Entry], int]:
    """Each usable row as an entry, and how many rows ``label_map`` dropped; what is wrong with the others is added
    to ``errors`` (all are reported at once)."""
    base = Path(os.path.normpath(root))
    entries: list[Entry] = []
    seen: dict[Path, str] = {}
    dropped = 0
    for where, row in rows:
        try:
            raw_path = template.format(**row) if template else row[str(t.path)]
        except (KeyError, ValueError, IndexError) as exc:
            errors.append(f"{where}: dataset.table.path_template {template!r} cannot be filled ({exc})")
            continue
        raw_label = "" if t.finding_columns else row[str(t.label)]
        if not raw_path or (not raw_label and not t.finding_columns):
            errors.append(f"{where}: empty {'path' if not raw_path else 'label'}")
            continue
        path = Path(os.path.normpath(base / raw_path))  # lexical: a symlinked image folder inside root is fine
        if path != base and base not in path.parents:
            errors.append(f"{where}: path {raw_path!r} is outside the images root {root} (dataset.root)")
            continue
        if path in seen:
            errors.append(f"{where}: repeats the image of {seen[path]} ({raw_path}); list each image once")
            continue
        seen[path] = where
        label: Any
        if t.finding_columns:
            label = {str(c): row[str(c)] for c in t.finding_columns}
        elif t.label_sep:
            label = split_findings(raw_label, str(t.label_sep), str(t.no_finding), label_map)
        else:
            label = label_map.get(raw_label, raw_label)
        if label is None:
            dropped += 1
            continue
        split = "train"
        if t.split:
            split = split_of.get(row[str(t.split)].lower(), "")
            if not split:
                errors.append(f"{where}: split {row[str(t.split)]!r} is not one of {', '.join(split_of)} "
                              "(dataset.splits)")
                continue
        group = row[str(t.group)] if t.group else None
        entries.append((where, path, label if isinstance(label, (list, dict)) else str(label), (group or f"row:{where}") if t.group else None, split))
    return entries, dropped


def _by_split(entries: list[Entry], coded: list[tuple[int, tuple[float, ...] | None]], grouped: bool, file: Path,
              root: Path) -> tuple[dict[str, Samples], list[tuple[str, str]]]:
    """The entries whose file exists as ``Samples`` per split (``coded``: each entry's class index and, multi-label,
    its finding vector), and the rows skipped for a missing file."""
    splits: dict[str, Samples] = {}
    missing: list[tuple[str, str]] = []
    for (where, path, _, group, split), (label, vector) in zip(entries, coded, strict=True):
        if not path.is_file():
            missing.append((str(path), f"{file.name} {where}: no such file"))
            continue
        samples = splits.setdefault(split, Samples(groups=[] if grouped else None,
                                                   targets=[] if vector is not None else None))
        samples.paths.append(path)
        samples.labels.append(label)
        if samples.targets is not None and vector is not None:
            samples.targets.append(vector)
        if samples.groups is not None:
            samples.groups.append(str(group))
    if missing:
        log.warning("%d of %d row(s) of %s name a file that does not exist under %s; skipped, e.g. %s", len(missing),
                    len(entries), file.name, root, missing[0][1])
    return splits, missing


class Table(Layout):
    """A CSV or Parquet file listing each image's path, label and optionally its group and split
    (``dataset.table``)."""

    what = f"a table ({', '.join(sorted(TABLE_SUFFIXES))})"

    def describes(self, ds: DatasetConfig) -> bool:
        return ds.table is not None

    def holds(self, location: Path) -> bool:
        return is_table(location)

    def scan(self, ds: DatasetConfig, root: Path) -> Scanned:
        table = load_table(ds, root)
        splits = {name: attach_groups(table.splits[name], ds) for name in SPLITS
                  if name in table.splits}
        return Scanned(table.classes, splits, missing=table.missing, root=root)

    def scan_location(self, ds: DatasetConfig, location: Path, classes: list[str]) -> Scanned:
        """Every row whatever its split, with the training config's column settings (``dataset.table``) and paths
        relative to the table's folder."""
        settings = replace(ds.table or TableConfig(), file=str(location), split=None)
        found = load_table(replace(ds, table=settings, classes=list(classes)), location.parent)
        samples = functools.reduce(operator.add, found.splits.values())
        return Scanned(found.classes, {"data": samples}, missing=found.missing, root=location.parent)
