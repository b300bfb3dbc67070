"""Subgroup results (``evaluate group_by=<column>``): the headline metrics per value of a table's metadata column
(site, sex, age band, scanner) or of a DICOM header field, each with the grouped interval, and the largest gap
between two subgroups named. A model that is good on average can fail one site or one scanner."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellcls.data.dicom import header_values, is_dicom
from cellcls.data.layouts.table import read_rows
from cellcls.errors import ConfigError, DataError, nearest
from cellcls.infra.run_folder import write_csv
from cellcls.metric_names import HEADLINE
from cellcls.scoring.metrics import IntervalRule, evaluate_predictions

MISSING = "(missing)"
BANDS = 4  # a numeric column with many values is cut into quartile bands
_DICOM_AGE = re.compile(r"^(\d{3})([DWMY])$")  # DICOM's age string, e.g. 045Y
_DAYS = {"D": 1, "W": 7, "M": 30.4375, "Y": 365.25}


def column_values(column: str, paths: Sequence[Path], table: Path | None, root: Path | None,
                  path_column: str = "path", template: str | None = None) -> list[str]:
    """Each image's value of ``column``: from ``table`` (its rows matched to ``paths`` through the path column or
    template, relative to ``root``) when the column is there, else from the DICOM header field of that name."""
    if table is not None:
        columns, rows = read_rows(table)
        if column in columns:
            base = root if root is not None else table.parent
            by_path: dict[Path, str] = {}
            for _, row in rows:
                raw = template.format(**row) if template else row.get(path_column, "")
                by_path[Path(os.path.normpath(base / raw))] = row[column].strip()
            return [by_path.get(Path(os.path.normpath(p)), "") or MISSING for p in paths]
        if not _all_dicom(paths):
            raise ConfigError(f"group_by={column!r}: {table} has no column {column!r}{nearest(column, columns)}; "
                              f"its columns: {', '.join(columns)} (or a DICOM header field, for DICOM files)")
    if not _all_dicom(paths):
        raise ConfigError(f"group_by={column!r} needs a metadata column: the images must be listed in a table "
                          "(dataset.table, or evaluate data=<table>) with that column, or be DICOM files with that "
                          "header field; these are image files in folders. group_by=patient gives per-patient results")
    return [v or MISSING for v in header_values(paths, column, setting="group_by")]


def _all_dicom(paths: Sequence[Path]) -> bool:
    return bool(paths) and all(is_dicom(p) for p in paths[:20])


def banded(values: Sequence[str]) -> list[str]:
    """Numeric values (or DICOM ages) with more than ``2 * BANDS`` distinct values as quartile bands ("40-57");
    anything else unchanged."""
    numbers = [_number(v) for v in values]
    known = np.array([x for x in numbers if x is not None])
    if len(known) < len([v for v in values if v != MISSING]) or len(np.unique(known)) <= 2 * BANDS:
        return list(values)
    edges = np.unique(np.quantile(known, np.linspace(0, 1, BANDS + 1)))
    labels = [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]
    out = []
    for value, x in zip(values, numbers):
        if x is None:
            out.append(value)
        else:
            out.append(labels[min(int(np.searchsorted(edges, x, side="right")) - 1, len(labels) - 1)])
    return out


def _number(value: str) -> float | None:
    age = _DICOM_AGE.match(value)
    if age:
        return int(age.group(1)) * _DAYS[age.group(2)] / 365.25  # years
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x) >= 10 or x == int(x) else f"{x:.2g}"


def subgroup_metrics(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], threshold: float | None,
                     values: Sequence[str], groups: Sequence[str] | None, seed: int, column: str,
                     intervals: IntervalRule = IntervalRule()) -> dict[str, Any]:
    """Per subgroup: images, patients and each headline metric with its grouped interval; and the largest gap
    (the metric whose subgroup values differ most, among subgroups of at least 2 patients or 10 images)."""
    values = np.asarray(values)
    out: dict[str, Any] = {"column": column, "subgroups": []}
    for value in sorted(set(values.tolist())):
        rows = values == value
        members = None if groups is None else [g for g, r in zip(groups, rows) if r]
        scores = evaluate_predictions(y[rows], probs[rows], classes, threshold, intervals.resamples, seed=seed,
                                      groups=members, interval=intervals.method)
        out["subgroups"].append({
            "value": str(value), "images": int(rows.sum()),
            "groups": None if members is None else len(set(members)),
            **{k: scores[k] for k in HEADLINE if k in scores}})
    out["largest_gap"] = largest_gap(out["subgroups"])
    return out


def largest_gap(subgroups: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The metric and pair of subgroups with the largest difference, and whether their intervals overlap."""
    sizeable = [s for s in subgroups if (s["groups"] or 0) >= 2 or (s["groups"] is None and s["images"] >= 10)]
    best = None
    for key in HEADLINE:
        scored = [s for s in sizeable if key in s and not math.isnan(s[key]["value"])]
        if len(scored) < 2:
            continue
        low = min(scored, key=lambda s: s[key]["value"])
        high = max(scored, key=lambda s: s[key]["value"])
        gap = high[key]["value"] - low[key]["value"]
        if best is None or gap > best["difference"]:
            best = {"metric": key, "difference": gap, "lower": low["value"], "higher": high["value"],
                    "lower_value": low[key]["value"], "higher_value": high[key]["value"],
                    "intervals_overlap": bool(low[key]["ci95"][1] >= high[key]["ci95"][0])}
    return best


def describe_gap(gap: dict[str, Any] | None, column: str) -> str:
    """The largest gap as a sentence."""
    if gap is None:
        return f"no two subgroups of {column} are large enough to compare (2 patients or 10 images each)"
    return (f"largest gap: {gap['metric']} {gap['lower_value']:.4f} for {column}={gap['lower']} against "
            f"{gap['higher_value']:.4f} for {column}={gap['higher']} (difference {gap['difference']:.4f}; the 95% "
            f"intervals {'overlap' if gap['intervals_overlap'] else 'do not overlap'})")


def write_subgroups(path: Path, result: dict[str, Any]) -> Path:
    """``subgroups.csv``: one row per subgroup, each metric with its interval bounds."""
    keys = [k for k in HEADLINE if any(k in s for s in result["subgroups"])]
    rows = [{result["column"]: s["value"], "images": s["images"], "groups": "" if s["groups"] is None else s["groups"],
             **{c: f"{v:.6f}" for k in keys if k in s
                for c, v in ((k, s[k]["value"]), (f"{k}_lo", s[k]["ci95"][0]), (f"{k}_hi", s[k]["ci95"][1]))}}
            for s in result["subgroups"]]
    columns = (result["column"], "images", "groups", *(c for k in keys for c in (k, f"{k}_lo", f"{k}_hi")))
    return write_csv(path, rows, columns=columns)


def require_all_decoded(n_scored: int, n_samples: int, column: str) -> None:
    """Subgroup values are per file: every file must have been scored."""
    if n_scored != n_samples:
        raise DataError(f"group_by={column}: some images could not be decoded; fix or remove them (see the warnings)")
