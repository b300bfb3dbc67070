"""Sweeps: each job's result record, and the summary table a Hydra callback writes when a sweep ends."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cellcls.metric_names import TEST_METRICS, metric_mode
from cellcls.infra.run_folder import RunFolder, atomic_write, write_json

log = logging.getLogger(__name__)


def write_status(run_dir: Path, status: str, overrides: list[str], error: str, traceback: str | None = None) -> None:
    """``result.json`` of a run that did not finish: ``failed``, ``diverged`` or ``interrupted`` (a finished run's
    is written by the RunRecord callback). A disk too full to take it is not worth a second error."""
    record = {"status": status, "overrides": overrides, "error": error}
    if traceback:
        record["traceback"] = traceback
    try:
        write_json(RunFolder(run_dir).result, record)
    except OSError:
        pass


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job record under ``sweep_dir`` (jobs that died before writing one are reported as such)."""
    records = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        result = RunFolder(job_dir).result
        if result.is_file():
            record = json.loads(result.read_text())
        else:
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file))
            record = {"status": "failed", "error": "the job ended without a result (killed?)", "overrides": overrides}
        record["run_dir"] = str(job_dir)
        records.append(record)
    return records


def _sort_key(record: dict[str, Any]) -> tuple[int, float]:
    best = record.get("best")
    if record.get("status") != "ok" or best is None or not math.isfinite(best):
        return (1, 0.0)
    return (0, best if record.get("mode", "min") == "min" else -best)


def _interval_text(test: dict[str, Any]) -> str:
    ci = (test.get("ci95") or {}).get("accuracy")
    return f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else ""


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """``summary.csv`` and ``summary.md`` in ``sweep_dir``, best monitored value first, failed jobs last."""
    records = sorted(collect(sweep_dir), key=_sort_key)
    if not records:
        return records
    test_keys = sorted({k for r in records for k in (r.get("test") or {}) if k in TEST_METRICS})
    # the test accuracy's 95% interval as evaluate computes it (over patients where known), when the runs have it
    with_ci = any("accuracy" in ((r.get("test") or {}).get("ci95") or {}) for r in records)
    ci_keys = ["test_accuracy_ci95"] if with_ci else []
    header = ["rank", "status", "overrides", "monitor", "best", "best_epoch", *[f"test_{k}" for k in test_keys],
              *ci_keys, "run_dir", "error"]
    rows = []
    for rank, r in enumerate(records, start=1):
        test = r.get("test") or {}
        rows.append([rank, r.get("status"), " ".join(r.get("overrides", [])), r.get("monitor", ""),
                     r.get("best", ""), r.get("best_epoch", ""), *[test.get(k, "") for k in test_keys],
                     *([_interval_text(test)] if with_ci else []), r["run_dir"], r.get("error", "")])
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write(sweep_dir / "summary.csv", buf.getvalue())

    atomic_write(sweep_dir / "summary.md", summary_markdown(records, header, rows, sweep_dir))
    return records


def summary_markdown(records: list[dict[str, Any]], header: list[str], rows: list[list[Any]], sweep_dir: Path) -> str:
    """The table for a person: the overrides every job shares said once above it, each row only what varies, and
    run folders relative to the sweep folder."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lists = [list(r.get("overrides", [])) for r in records]
    shared = [o for o in (lists[0] if lists else []) if all(o in other for other in lists)]
    lines = [f"Sweep in `{sweep_dir}`: {len(records)} job(s), best {records[0].get('monitor', '')} first.", ""]
    lines.append("Shared by every job: " + (" ".join(f"`{o}`" for o in shared) if shared else "nothing") + ".")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, own in zip(rows, lists):
        row = list(row)
        row[header.index("overrides")] = " ".join(o for o in own if o not in shared) or "(none)"
        run_dir = Path(str(row[header.index("run_dir")]))
        row[header.index("run_dir")] = run_dir.relative_to(sweep_dir).as_posix() + "/" if run_dir.is_relative_to(sweep_dir) else run_dir
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write the summary table into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = write_summary(sweep_dir)
        failed = sum(1 for r in records if r.get("status") != "ok")
        log.info("sweep summary: %d job(s), %d failed -> %s", len(records), failed, sweep_dir / "summary.md")


def direction(monitor: str, mode: str = "auto") -> str:
    """Optuna's direction for the monitored metric ('minimize' for losses; python -m cellcls.tune)."""
    return "minimize" if metric_mode(monitor, mode) == "min" else "maximize"
