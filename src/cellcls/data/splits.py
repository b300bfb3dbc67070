"""Seeded, stratified hold-out splits and their audit files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cellcls.data.layout import Samples
from cellcls.errors import ConfigError


def stratified_holdout(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Split ``samples`` into (kept, held out) with ``fraction`` held out, class proportions preserved."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction must be in (0, 1) when no validation folder exists, got {fraction}")
    indices = np.arange(len(samples))
    kept, held = train_test_split(indices, test_size=fraction, stratify=samples.labels, random_state=seed)
    return samples.subset(sorted(kept)), samples.subset(sorted(held))


def write_split_lists(run_dir: Path, splits: dict[str, Samples], root: Path, classes: list[str]) -> None:
    """Write ``splits/<split>.csv`` (file relative to the data root, class) so a split can be audited and reused."""
    out = run_dir / "splits"
    out.mkdir(parents=True, exist_ok=True)
    for name, samples in splits.items():
        lines = ["file,class"]
        for path, label in zip(samples.paths, samples.labels, strict=True):
            try:
                rel = path.relative_to(root)
            except ValueError:
                rel = path
            lines.append(f"{rel.as_posix()},{classes[label]}")
        (out / f"{name}.csv").write_text("\n".join(lines) + "\n")
