"""``python -m cellcls.audit dataset=<name> dataset.root=<dir> [overrides] [output=<dir>] [truth=<csv>] [top=<n>]``
or ``python -m cellcls.audit run=<run folder> [output=<dir>]``

Finds exact and near-duplicate images (flipped, rotated, shifted, cropped, resized or re-encoded copies) within and
across the splits a training run would use (the same overrides as ``cellcls.train``), or those a run did use (its
``splits/*.csv``). Writes duplicates.csv (one row per image in a cluster), summary.json (counts per split pair),
report.md and largest_clusters.png to ``output`` (default: ``<run>/audit`` or ``audit/<dataset>``) and prints the report.

``truth=<csv>`` (columns ``file``, relative to the CSV's folder, and ``group``) also measures how well the clusters
recover known groups, e.g. ``truth=../shared/data/MANIFEST.csv``. How duplicates are found: ``dataset.duplicates.*``.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from cellcls.cli import command_args, fail, split_own
from cellcls.training.validate import validate
from cellcls.config.targets import check_targets
from cellcls.config.schema import DatasetConfig, typed
from cellcls.errors import ConfigError, DataError
from cellcls.infra.run_folder import AuditFolder, RunFolder, write_json

OWN = ("run", "output", "truth", "top")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    from cellcls.data.audit import audit_splits, recovery, report_text, write_audit
    from cellcls.data.datamodule import make_splits, resolve_root
    from cellcls.data.layouts import scan
    from cellcls.data.splits import read_split_lists

    own, overrides = split_own(args, OWN)
    try:
        if "run" in own:
            if overrides:
                raise ConfigError(f"audit run=<folder> audits the run's own splits; it takes no overrides, got {overrides}")
            run = RunFolder(Path(own["run"]).expanduser())
            if not run.config.is_file():
                raise ConfigError(f"run={own['run']}: no {run.config.name} there; expected a cellcls run folder")
            cfg = OmegaConf.load(run.config)
            check_targets(cfg, source=str(run.config))
            ds = typed(cfg.dataset, DatasetConfig)
            root = resolve_root(ds)
            classes = list(ds.classes or scan(ds, root).classes)
            splits = read_split_lists(run, root, classes)
            folder = AuditFolder(Path(own["output"])) if "output" in own else run.audit
        else:
            from cellcls.config import check_command_line, compose_config

            check_command_line(overrides)
            cfg = compose_config(overrides)
            validate(cfg)
            ds = typed(cfg.dataset, DatasetConfig)
            root = resolve_root(ds)
            scanned = scan(ds, root)
            classes = scanned.classes
            splits = make_splits(ds, scanned.splits, classes, int(cfg.seed))[0]
            folder = AuditFolder(Path(own.get("output", f"audit/{ds.name}")))
        audit = audit_splits(splits, classes, root, ds.duplicates)
        summary = write_audit(audit, folder, int(own.get("top", 8)))
        if "truth" in own:
            summary["recovery"] = recovery(audit, read_truth(Path(own["truth"])))
            write_json(folder.summary, summary)
    except (ConfigError, DataError, OSError, ValueError) as exc:
        return fail(exc)
    print(report_text(audit, summary, folder))
    if "recovery" in summary:
        print("recovery of the known groups: " + json.dumps(summary["recovery"]))
    print(f"written to {folder.root}")
    return 0


def read_truth(file: Path) -> dict[Path, str]:
    """Known groups from a CSV with columns ``file`` (relative to the CSV's folder) and ``group``."""
    with file.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"file", "group"} <= set(reader.fieldnames or ()):
            raise DataError(f"truth={file}: expected columns 'file' and 'group', found {reader.fieldnames}")
        return {(file.parent / row["file"]).resolve(): row["group"] for row in reader}


if __name__ == "__main__":
    sys.exit(main())
