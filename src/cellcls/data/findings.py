"""Multi-label tables: each row names several findings (ChestX-ray14's ``Finding Labels``, or CheXpert's one column
per finding), read into one 1 / 0 / NaN vector per image.

Two forms (``dataset.table``): ``label_sep="|"`` splits the label column into findings (``no_finding`` names none);
``finding_columns=[...]`` reads one column per finding holding 1, 0, blank (not mentioned: 0) or -1 (uncertain,
mapped by ``uncertain``: ignore = NaN, left out of that finding's loss and metrics; zeros; ones). ``label_map`` renames
findings (a finding mapped to null is left out of the row). The findings are ``dataset.classes`` when given (a finding
outside them is an error naming the row), else those the table names, sorted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cellcls.errors import ConfigError, DataError

POSITIVE = frozenset({"1", "1.0", "true", "yes"})
NEGATIVE = frozenset({"", "0", "0.0", "false", "no"})
UNCERTAIN_VALUES = frozenset({"-1", "-1.0"})
UNCERTAIN_AS = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}


def is_multilabel(ds: Any) -> bool:
    """Whether a dataset config (typed, composed or a checkpoint's plain copy) is a multi-label table."""
    table = ds.get("table") if isinstance(ds, Mapping) else getattr(ds, "table", None)
    if table is None:
        return False
    get = table.get if isinstance(table, Mapping) else lambda k: getattr(table, k, None)
    return bool(get("label_sep") or get("finding_columns"))


def split_findings(raw: str, sep: str, no_finding: str, label_map: Mapping[str, Any]) -> list[str]:
    """The findings one label cell names (renamed by ``label_map``; ``no_finding`` and empty parts name none)."""
    found = []
    for part in raw.split(sep):
        part = part.strip()
        if not part or part.lower() == no_finding.lower():
            continue
        mapped = label_map.get(part, part)
        if mapped is not None and str(mapped) not in found:
            found.append(str(mapped))
    return found


def finding_value(raw: str, uncertain: str) -> float | None:
    """One CheXpert cell as 1, 0 or the uncertain policy's value; None for a value that is none of these."""
    value = raw.strip().lower()
    if value in POSITIVE:
        return 1.0
    if value in NEGATIVE:
        return 0.0
    if value in UNCERTAIN_VALUES:
        return UNCERTAIN_AS[uncertain]
    return None


def finding_vectors(labels: Sequence[list[str] | dict[str, str]], where: Sequence[str], classes: list[str] | None,
                    uncertain: str, errors: list[str]) -> tuple[list[str], list[tuple[float, ...]]]:
    """The findings and each row's vector, from either form: a list of finding names per row (``label_sep``) or
    the row's finding-column values. What cannot be read is added to ``errors`` (each named by its row)."""
    if labels and isinstance(labels[0], dict):
        findings = list(labels[0])
        vectors = []
        for at, row in zip(where, labels, strict=True):
            values = [finding_value(row[f], uncertain) for f in findings]
            for f, v in zip(findings, values, strict=True):
                if v is None:
                    errors.append(f"{at}: column {f!r} holds {row[f]!r}; a finding column holds 1, 0, blank or -1 "
                                  "(uncertain, mapped by dataset.table.uncertain)")
            vectors.append(tuple(math.nan if v is None else v for v in values))
        return findings, vectors
    named = [list(x) for x in labels]  # type: ignore[arg-type]
    findings = list(classes) if classes else sorted({f for row in named for f in row})
    index = {f.lower(): i for i, f in enumerate(findings)}
    vectors = []
    for at, row in zip(where, named, strict=True):
        vector = [0.0] * len(findings)
        for f in row:
            if f.lower() not in index:
                errors.append(f"{at}: finding {f!r} is not one of the findings ({', '.join(findings)}, from "
                              "dataset.classes); add it there or map it with dataset.table.label_map")
                continue
            vector[index[f.lower()]] = 1.0
        vectors.append(tuple(vector))
    return findings, vectors


def stratum(vector: Sequence[float]) -> int:
    """The class index a multi-label row is split by: 0 for no finding, k + 1 for its first finding k."""
    return next((k + 1 for k, v in enumerate(vector) if v == 1.0), 0)


def positives_per_finding(vectors: Sequence[Sequence[float]], findings: list[str]) -> dict[str, tuple[int, int]]:
    """``finding -> (positives, negatives)`` over the rows (uncertain entries counted in neither)."""
    counts = {}
    for k, f in enumerate(findings):
        column = [v[k] for v in vectors]
        counts[f] = (sum(1 for v in column if v == 1.0), sum(1 for v in column if v == 0.0))
    return counts


def require_both_values(vectors: Sequence[Sequence[float]], findings: list[str], split: str) -> None:
    """A split must hold a positive and a negative image of every finding: without both it cannot be learnt or
    scored (ROC-AUC is undefined)."""
    lacking = [f"{f} ({p} positive, {n} negative)" for f, (p, n) in positives_per_finding(vectors, findings).items()
               if p == 0 or n == 0]
    if lacking:
        raise DataError(f"the {split} split lacks positive or negative images of finding(s): {'; '.join(lacking)}; "
                        "drop such findings (dataset.classes) or add images")


def require_single_label(ds: Any, what: str) -> None:
    """Refuse ``what`` (a tool built for one class per image) on a multi-label table, saying so."""
    if is_multilabel(ds):
        raise ConfigError(f"{what} works on single-label classes (one per image); this data set is a multi-label "
                          "table (dataset.table.label_sep / finding_columns), which trains, evaluates, predicts, "
                          f"exports and serves per finding but has no {what} yet")
