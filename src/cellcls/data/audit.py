"""The duplicate audit of a data set's (or a run's) splits: clusters, counts per split pair, a CSV and an image grid."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations_with_replacement
from pathlib import Path
from typing import Any

from sklearn.metrics.cluster import pair_confusion_matrix

from cellcls.config.schema import DuplicatesConfig
from cellcls.data.decode import decode_image
from cellcls.data.duplicates import Duplicates, cached_duplicates
from cellcls.data.samples import Samples
from cellcls.data.splits import relative_path
from cellcls.errors import DataError
from cellcls.infra.run_folder import AuditFolder, atomic_write, write_csv, write_json


@dataclass
class Audit:
    """Every audited file with its split and class, and the clusters found among them."""

    files: list[Path]
    splits: list[str]
    classes: list[str]
    duplicates: Duplicates
    root: Path

    def clusters(self) -> list[list[int]]:
        """Clusters of two or more files, largest first."""
        return sorted(self.duplicates.members().values(), key=lambda m: (-len(m), m[0]))

    def split_pairs(self) -> list[dict[str, Any]]:
        """For each pair of splits (a split with itself too): the clusters spanning both and how many images of
        each side are in them. Within one split it counts the images that have a copy in the same split."""
        names = list(dict.fromkeys(self.splits))
        rows = []
        for a, b in combinations_with_replacement(names, 2):
            shared, images_a, images_b = 0, 0, 0
            for members in self.clusters():
                in_a = sum(self.splits[i] == a for i in members)
                in_b = sum(self.splits[i] == b for i in members)
                if (a == b and in_a > 1) or (a != b and in_a and in_b):
                    shared += 1
                    images_a += in_a
                    images_b += in_b
            rows.append({"splits": f"{a}-{b}", "clusters": shared, f"images_{a}" if a != b else "images": images_a,
                         **({f"images_{b}": images_b} if a != b else {})})
        return rows

    def summary(self) -> dict[str, Any]:
        clusters = self.clusters()
        mixed = [m for m in clusters if len({self.classes[i] for i in m}) > 1]
        return {
            "images": len(self.files),
            "images_per_split": dict(Counter(self.splits)),
            "unreadable": len(self.duplicates.unreadable),
            "clusters": len(clusters),
            "images_in_clusters": sum(len(m) for m in clusters),
            "exact_pairs": sum(1 for p in self.duplicates.pairs if p[2] < 0),
            "largest_cluster": len(clusters[0]) if clusters else 1,
            "clusters_with_several_classes": len(mixed),
            "split_pairs": self.split_pairs(),
        }


def audit_splits(
    splits: dict[str, Samples], classes: list[str], root: Path, settings: DuplicatesConfig, progress: bool = True
) -> Audit:
    """Find the near-duplicates among all files of ``splits`` (a file listed in two splits counts in both)."""
    files = [p for samples in splits.values() for p in samples.paths]
    if not files:
        raise DataError("nothing to audit: every split is empty")
    names = [name for name, samples in splits.items() for _ in samples.paths]
    labels = [classes[label] for samples in splits.values() for label in samples.labels]
    return Audit(files, names, labels, cached_duplicates(files, settings, progress), root)


def write_audit(audit: Audit, folder: AuditFolder, top: int = 8) -> dict[str, Any]:
    """Write the CSV of clusters, summary.json, report.md and the grid of the ``top`` largest clusters."""
    inliers: dict[int, int] = {}
    for i, j, n in audit.duplicates.pairs:
        for k in (i, j):
            inliers[k] = max(inliers.get(k, 0), n if n >= 0 else 10**6)
    rows = []
    for number, members in enumerate(audit.clusters(), start=1):
        for i in members:
            rows.append({"cluster": number, "size": len(members), "split": audit.splits[i], "class": audit.classes[i],
                         "file": relative_path(audit.files[i], audit.root),
                         "match": "exact" if inliers.get(i) == 10**6 else f"{inliers.get(i, 0)} keypoints"})
    write_csv(folder.clusters, rows, columns=("cluster", "size", "split", "class", "file", "match"))
    summary = audit.summary()
    write_json(folder.summary, summary)
    atomic_write(folder.report, report_text(audit, summary, folder))
    if rows:
        cluster_grid(audit, folder.grid, top)
    return summary


def report_text(audit: Audit, summary: dict[str, Any], folder: AuditFolder) -> str:
    """The audit as Markdown (also printed by ``python -m cellcls.audit``)."""
    per_split = ", ".join(f"{n} {s}" for s, n in summary["images_per_split"].items())
    lines = [
        f"# Duplicate audit of {audit.root}", "",
        f"{summary['images']} images ({per_split}); {summary['unreadable']} unreadable.",
        (f"{summary['images_in_clusters']} images are in {summary['clusters']} clusters of exact or near-duplicate "
         f"copies (largest: {summary['largest_cluster']}); {summary['exact_pairs']} pixel-identical pairs."),
    ]
    if summary["clusters_with_several_classes"]:
        lines.append(f"{summary['clusters_with_several_classes']} clusters hold more than one class: the same "
                     "image labelled differently, or copies of one photo showing several cells.")
    lines += ["", "| splits | clusters | images |", "|---|---|---|"]
    for row in summary["split_pairs"]:
        a, _, b = row["splits"].partition("-")
        images = str(row["images"]) if a == b else f"{row[f'images_{a}']} {a} / {row[f'images_{b}']} {b}"
        lines.append(f"| {a} & {b} | {row['clusters']} | {images} |")
    lines += ["", ("A cluster spanning train and val/test means copies of one original are on both sides: those "
                   "scores are optimistic. Split by cluster with dataset.split_by=duplicates."), "",
              f"Clusters: {folder.clusters.name}; largest clusters: {folder.grid.name}."]
    return "\n".join(lines) + "\n"


def cluster_grid(audit: Audit, path: Path, top: int = 8, per_row: int = 8) -> Path:
    """The ``top`` largest clusters, one row each (up to ``per_row`` images), titled with split and class."""
    from cellcls.infra.plots import (  # matplotlib only when a figure is drawn
        plt,
        save,
        to_display,
    )

    clusters = audit.clusters()[:top]
    cols = min(per_row, max(len(m) for m in clusters))
    fig, axes = plt.subplots(len(clusters), cols, figsize=(1.6 * cols, 1.9 * len(clusters) + 0.4), squeeze=False,
                             layout="constrained")
    for row, members in enumerate(clusters):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            if col >= len(members):
                continue
            i = members[col]
            try:
                ax.imshow(to_display(decode_image(audit.files[i], 3, (96, 96))))
            except DataError:
                continue
            ax.set_title(f"{audit.splits[i]} / {audit.classes[i]}", fontsize=7)
        axes[row][0].text(-0.08, 0.5, f"cluster {row + 1}\n{len(members)} images", transform=axes[row][0].transAxes,
                          ha="right", va="center", fontsize=8)
    fig.suptitle("Largest near-duplicate clusters (split / class of each copy)", fontsize=10)
    return save(fig, path)


def recovery(audit: Audit, truth: dict[Path, str]) -> dict[str, float]:
    """Pairwise precision and recall of the clusters against known groups (``truth``: file -> group), over the
    files ``truth`` knows: how well the audit recovers, say, the blood cells' original photos."""
    known = [i for i, f in enumerate(audit.files) if f in truth]
    if not known:
        raise DataError("none of the audited files is listed in the ground-truth groups")
    groups = [truth[audit.files[i]] for i in known]
    (_, false_join), (false_split, together) = pair_confusion_matrix(groups, audit.duplicates.cluster[known]) // 2
    return {"images": len(known), "groups": len(set(groups)),
            "precision": together / (together + false_join) if together + false_join else 1.0,
            "recall": together / (together + false_split) if together + false_split else 1.0}
