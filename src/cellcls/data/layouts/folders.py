"""The class-folder layout: a download's split folders (``train/``, ``TEST/``, ...) each holding one folder per
class, found wherever the user's root points inside it (every data set of the tutorials, and a user's own)."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from cellcls.config.schema import DatasetConfig
from cellcls.data.layouts.base import Layout, Scanned
from cellcls.data.samples import SPLITS, Samples
from cellcls.data.splits import attach_groups
from cellcls.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"})
SKIP_DIRS = re.compile(r"^(__MACOSX|\..*)$")


def split_names(splits: Mapping[str, object]) -> dict[str, list[str]]:
    """``dataset.splits`` (as a plain mapping) with each split's names as a list of strings: the folder names of a
    download, or the values of a table's split column."""
    return {k: [str(n) for n in ([v] if isinstance(v, str) else (v or []))] for k, v in splits.items()}  # type: ignore[union-attr]


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not SKIP_DIRS.match(p.name))
    except OSError:
        return []


def _by_lower_name(folder: Path, what: str = "class folders") -> dict[str, Path]:
    """``folder``'s sub-folders by lower-case name; two that differ only in case are refused (names are matched
    case-insensitively, so keeping both would give one class two labels, and dropping one would lose images)."""
    by_name: dict[str, Path] = {}
    for p in _subdirs(folder):
        twin = by_name.setdefault(p.name.lower(), p)
        if twin is not p:
            raise DataError(f"{folder}: {what} {twin.name!r} and {p.name!r} differ only in letter case; cellcls matches "
                            "names case-insensitively, so move the images of one into the other (or rename one)")
    return by_name


def class_names(cls: str, aliases: Mapping[str, Sequence[str]] | None) -> list[str]:
    """The names (lower case) a class goes by: its own and its ``dataset.class_aliases``."""
    return [cls.lower()] + [a.lower() for a in (aliases or {}).get(cls, [])]


def match_class_dirs(
    folder: Path, classes: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None
) -> list[Path] | None:
    """The folder of each class inside ``folder`` (case-insensitive, aliases allowed), or None if any is missing."""
    found = _by_lower_name(folder)
    dirs = []
    for cls in classes:
        match = next((found[n] for n in class_names(cls, aliases) if n in found), None)
        if match is None:
            return None
        dirs.append(match)
    return dirs


def find_class_dirs(split_dir: Path, classes: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None) -> list[Path]:
    """Like ``match_class_dirs`` but a missing class is an error naming what was expected and found."""
    if not split_dir.is_dir():
        raise DataError(f"expected a folder at {split_dir} holding one sub-folder per class {list(classes)}, found none")
    dirs = match_class_dirs(split_dir, classes, aliases)
    if dirs is None:
        found = [p.name for p in _subdirs(split_dir)]
        have = {n.lower() for n in found}
        missing = [c for c in classes if not any(n in have for n in class_names(c, aliases))]
        raise DataError(
            f"{split_dir}: no folder for class(es) {missing}; expected one sub-folder per class "
            f"{list(classes)} (case-insensitive), found {found or 'no sub-folders'}"
        )
    return dirs


def visible_entries(folder: Path) -> list[Path]:
    """Everything below ``folder``, sorted, without hidden files and folders (``.DS_Store``, macOS's ``._x.png``,
    ``.ipynb_checkpoints/``) or ``__MACOSX/``: what training reads, and so what predict reads."""
    return sorted(p for p in folder.rglob("*") if not any(SKIP_DIRS.match(part) for part in p.relative_to(folder).parts))


def unmatched_folders(
    folder: Path, classes: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None
) -> list[Path]:
    """Sub-folders of a split's folder that hold images but match no class (a class the training folder lacks)."""
    known = {n for c in classes for n in class_names(c, aliases)}
    return [p for name, p in _by_lower_name(folder).items() if name not in known
            and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.rglob("*") if f.is_file())]


def scan_split(split_dir: Path, classes: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None) -> Samples:
    """All image files under each class folder of ``split_dir`` (recursively), sorted for reproducibility.

    Files with other extensions are recorded in ``ignored``; a class folder without images is an error.
    """
    samples = Samples()
    for label, class_dir in enumerate(find_class_dirs(split_dir, classes, aliases)):
        entries = visible_entries(class_dir)
        files = [p for p in entries if p.is_file()]
        samples.broken += [(str(p), _broken_link(p)) for p in entries if p.is_symlink() and not p.exists()]
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        samples.ignored += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples.paths += images
        samples.labels += [label] * len(images)
    return samples


def _broken_link(path: Path) -> str:
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 raises this for a loop
        return "a symbolic link that loops back on itself"
    except OSError as exc:
        if exc.errno == 40:  # ELOOP
            return "a symbolic link that loops back on itself"
    return f"a symbolic link to {path.readlink()}, which does not exist"


def discover_classes(split_dir: Path) -> list[str]:
    """Class names of a user's own data set: the sub-folders of its training folder, sorted."""
    names = [p.name for p in _by_lower_name(split_dir).values()]
    if len(names) < 2:
        raise DataError(f"{split_dir}: expected one sub-folder per class (at least 2), found {names or 'none'}")
    return names


def _walk(root: Path, max_depth: int):
    queue = deque([(root, 0)])
    while queue:
        folder, depth = queue.popleft()
        yield folder
        if depth < max_depth:
            queue.extend((child, depth + 1) for child in _subdirs(folder))


def _child(folder: Path, names: Sequence[str]) -> Path | None:
    if not names:
        return None
    by_name = _by_lower_name(folder, "folders")
    for name in names:
        if Path(name).is_absolute():
            return Path(name) if Path(name).is_dir() else None
        if name.lower() in by_name:
            return by_name[name.lower()]
    return None


def _tree(root: Path, depth: int = 2, limit: int = 12) -> str:
    lines = []
    for folder in _walk(root, depth):
        rel = folder.relative_to(root).as_posix()
        kids = _subdirs(folder)
        files = sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
        lines.append(f"  {rel or '.'}/  ({len(kids)} folders, {files} files)")
        if len(lines) >= limit:
            lines.append("  ...")
            break
    return "\n".join(lines)


def locate_splits(
    root: Path,
    classes: Sequence[str],
    split_names: Mapping[str, Sequence[str]],
    aliases: Mapping[str, Sequence[str]] | None = None,
    max_depth: int = 4,
) -> dict[str, Path]:
    """The folder of each split present under ``root``: ``{'train': ..., 'val'?: ..., 'test'?: ...}``.

    ``root`` may be the top of the download or any folder down to the one holding the classes. A download
    with split folders is searched for the first folder (breadth-first) that holds ``split_names['train']`` with
    every class inside; a flat download (classes directly in a folder, as the malaria set) yields only 'train'.
    """
    if not root.is_dir():
        raise DataError(f"dataset.root={root}: no such folder")
    train_names = list(split_names.get("train") or [])
    if train_names:
        for base in _walk(root, max_depth):
            train = _child(base, train_names)
            if train is not None and match_class_dirs(train, classes, aliases) is not None:
                found = {"train": train}
                for split in ("val", "test"):
                    folder = _child(base, list(split_names.get(split) or []))
                    if folder is not None and match_class_dirs(folder, classes, aliases) is not None:
                        found[split] = folder
                return found
    for folder in _walk(root, max_depth):
        if match_class_dirs(folder, classes, aliases) is not None:
            return {"train": folder}
    class_part = "{" + ", ".join("|".join([c, *((aliases or {}).get(c, []))]) for c in classes) + "}"
    split_part = f"{'|'.join(train_names)}/" if train_names else ""
    others = [f"{'|'.join(v)}/" for k, v in split_names.items() if k != "train" and v]
    raise DataError(
        f"dataset.root={root} does not hold the expected layout.\n"
        f"expected: <root>/[...]/{split_part}{class_part}/<images>"
        + (f"  (optional beside it: {', '.join(others)})" if others else "")
        + f"\nfound:\n{_tree(root)}"
    )


class ClassFolders(Layout):
    """Split folders named by ``dataset.splits``, class folders named by ``dataset.classes`` (or, for a user's own
    data set, the training folder's sub-folders) and their ``class_aliases``."""

    what = "a folder whose sub-folders are the classes"

    def describes(self, ds: DatasetConfig) -> bool:
        return ds.table is None

    def holds(self, location: Path) -> bool:
        return location.is_dir()

    def scan(self, ds: DatasetConfig, root: Path) -> Scanned:
        classes, folders = self.locate(ds, root)
        aliases = ds.class_aliases
        for name, folder in folders.items():
            if extra := unmatched_folders(folder, classes, aliases):
                what = (f"{folder}: folder(s) {[p.name for p in extra]} hold images of no class the model learns "
                        f"({classes}")
                if not ds.classes:  # the classes came from the training folder: the layouts disagree
                    raise DataError(f"{what}, the training folder's sub-folders); add them to the training folder "
                                    "too, or move them out of the data set")
                log.warning("%s, dataset.classes); their images are not used", what)
        splits = {name: attach_groups(scan_split(folders[name], classes, aliases), ds)
                  for name in SPLITS if name in folders}
        return Scanned(classes, splits, folders, [p for s in splits.values() for p in s.ignored],
                       [b for s in splits.values() for b in s.broken], root)

    def scan_location(self, ds: DatasetConfig, location: Path, classes: list[str]) -> Scanned:
        samples = attach_groups(scan_split(location, classes, ds.class_aliases), ds)
        return Scanned(list(classes), {"data": samples}, {"data": location}, list(samples.ignored),
                       list(samples.broken), location)

    @staticmethod
    def locate(ds: DatasetConfig, root: Path) -> tuple[list[str], dict[str, Path]]:
        """Class names and the folder of each split present in the download."""
        names = split_names(ds.splits)
        aliases = ds.class_aliases
        classes = list(ds.classes) if ds.classes else None
        if classes is None:  # a user's own data set: the training folder's sub-folders are the classes
            train = next((root / n for n in names.get("train", []) if (root / n).is_dir()), root)
            classes = discover_classes(train)
        return classes, locate_splits(root, classes, names, aliases, int(ds.search_depth))
