"""The run folder: the one place that names every file a run, an evaluation or an export writes.

Every file is written through :func:`atomic_write` (a temporary file in the same folder, flushed to disk, then
renamed over the target), so a crash or a kill leaves either the previous complete file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def atomic_write(path: Path, content: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``content`` (text, bytes, or a function that writes to a binary file) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the run's files from the user's group
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                # surrogateescape: file names that are not valid UTF-8 are written back as their original bytes
                fh.write(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = ()) -> Path:
    """Rows of dicts as a CSV file; the columns are ``columns`` then every other key, in the order first seen."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys([*columns, *(k for row in rows for k in row)])))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, buf.getvalue())


@dataclass(frozen=True)
class RunFolder:
    """Names of a training run's files (``<run>/...``); create it with the folder a run writes to."""

    root: Path

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunFolder:
        """The run folder of ``<run>/checkpoints/<name>.pt`` (or the folder holding a loose checkpoint file)."""
        parent = checkpoint.parent
        return cls(parent.parent if parent.name == CHECKPOINTS else parent)

    # training
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def lock(self) -> Path:
        """Held by the training run writing this folder (cellcls.infra.run_lock), naming its process and host."""
        return self.root / ".run.lock"

    @property
    def probe_log(self) -> Path:
        """``python -m cellcls.probe``'s log (a training run's is Hydra's ``train.log``)."""
        return self.root / "probe.log"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def test_metrics(self) -> Path:
        return self.root / "test_metrics.json"

    @property
    def test_predictions(self) -> Path:
        """best.pt's probabilities for each test image (what cross-validation pools out of fold)."""
        return self.root / "test_predictions.csv"

    @property
    def cv_folds(self) -> Path:
        """Cross-validation: one row per fold, then the pooled out-of-fold row."""
        return self.root / "cv_folds.csv"

    @property
    def cv_predictions(self) -> Path:
        """Cross-validation: every image's out-of-fold probabilities, with its fold."""
        return self.root / "cv_predictions.csv"

    @property
    def cv_metrics(self) -> Path:
        return self.root / "cv_metrics.json"

    @property
    def cv_report(self) -> Path:
        return self.root / "cv_report.md"

    def fold(self, k: int) -> RunFolder:
        """The run folder of cross-validation fold ``k`` (0-based; named from 1)."""
        return RunFolder(self.root / f"fold_{k + 1}")

    @property
    def skipped_files(self) -> Path:
        return self.root / "skipped_files.txt"

    @property
    def model_summary(self) -> Path:
        return self.root / "model_summary.txt"

    @property
    def training_curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def augmented_samples(self) -> Path:
        return self.root / "augmented_samples.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run id of this run, so ``evaluate`` logs into the same MLflow run."""
        return self.root / "mlflow_run.json"

    def split_list(self, split: str) -> Path:
        return self.root / "splits" / f"{split}.csv"

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of atomic writes a killed process never finished; returns them."""
        stale = [tmp for folder in (self.root, self.checkpoints) for tmp in folder.glob(".*.tmp")]
        for tmp in stale:
            tmp.unlink(missing_ok=True)
        return stale

    # evaluation and export
    def evaluation(self, name: str) -> EvaluationFolder:
        """``eval/<split or folder name>/``: metrics.json, report.md, predictions.csv, figures."""
        return EvaluationFolder(self.root / "eval" / name)

    @property
    def evaluations(self) -> Path:
        return self.root / "eval" / "summary.csv"

    def export(self, suffix: str) -> Path:
        return self.root / "export" / f"model{suffix}"

    @property
    def web_export(self) -> Path:
        """``export/web/``: the folder that classifies images inside the browser (``export format=web``)."""
        return self.root / "export" / "web"

    @property
    def label_errors(self) -> Path:
        """``label_errors/``: the training images whose given label the out-of-fold models doubt, ranked."""
        return self.root / "label_errors"

    @property
    def audit(self) -> AuditFolder:
        """``audit/``: the duplicate audit of this run's splits (``python -m cellcls.audit run=<run>``)."""
        return AuditFolder(self.root / "audit")


@dataclass(frozen=True)
class EvaluationFolder:
    """Names of one evaluation's files (``<run>/eval/<split>/``, or ``evaluate output=<folder>``)."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def patients(self) -> Path:
        return self.root / "patients.csv"

    @property
    def subgroups(self) -> Path:
        """One row per subgroup of ``group_by=<column>``: images, patients, each metric with its interval."""
        return self.root / "subgroups.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def figure(self, name: str) -> Path:
        """``<name>.png``: reliability, confusion_matrix, predictions, confident_mistakes, gradcam, feature_maps,
        subgroups, and the run's own training_curves and augmented_samples."""
        return self.root / f"{name}.png"


@dataclass(frozen=True)
class AuditFolder:
    """Names of a duplicate audit's files (``python -m cellcls.audit``)."""

    root: Path

    @property
    def clusters(self) -> Path:
        """One row per image in a cluster of two or more: cluster, split, class, file, matched keypoints."""
        return self.root / "duplicates.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def grid(self) -> Path:
        """The largest clusters as an image grid."""
        return self.root / "largest_clusters.png"
