"""Finding class folders and image files in a download's layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellcls.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})


@dataclass
class Samples:
    """Image files and their class indices, plus what was passed over while scanning."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> Samples:
        return Samples([self.paths[i] for i in indices], [self.labels[i] for i in indices])


def find_class_dirs(split_dir: Path, classes: Sequence[str]) -> list[Path]:
    """The folder of each class in ``split_dir``, matched case-insensitively (NORMAL == Normal)."""
    if not split_dir.is_dir():
        raise DataError(f"expected a folder at {split_dir} holding one sub-folder per class {list(classes)}, found none")
    found = {p.name.lower(): p for p in split_dir.iterdir() if p.is_dir()}
    missing = [c for c in classes if c.lower() not in found]
    if missing:
        raise DataError(
            f"{split_dir}: no folder for class(es) {missing}; expected one sub-folder per class "
            f"{list(classes)} (case-insensitive), found {sorted(p.name for p in found.values()) or 'no sub-folders'}"
        )
    return [found[c.lower()] for c in classes]


def scan_split(split_dir: Path, classes: Sequence[str]) -> Samples:
    """All image files under each class folder of ``split_dir`` (recursively), sorted for reproducibility.

    Files with other extensions are recorded in ``ignored``; a class folder without images is an error.
    """
    samples = Samples()
    for label, class_dir in enumerate(find_class_dirs(split_dir, classes)):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        samples.ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples.paths += images
        samples.labels += [label] * len(images)
    return samples
