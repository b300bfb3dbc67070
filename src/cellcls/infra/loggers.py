"""Loggers: where a run's numbers and pictures go, each swappable from the ``logger`` config group.

``logger`` maps a name to ``{_target_: <class>, <arguments>}``; the default is ``[csv, tensorboard]``, and
``logger=[csv,tensorboard,mlflow]`` adds MLflow. Training logs each epoch, the config and model summary, the
figures and the hyper-parameters; ``python -m cellcls.evaluate`` logs its scores and figures into the same run.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellcls.config.targets import instantiate
from cellcls.errors import ConfigError
from cellcls.metric_names import EPOCH_METRICS, split_metric
from cellcls.infra.run_folder import RunFolder, atomic_write, write_csv


def tag(name: str) -> str:
    """A metric's chart name: ``train_loss`` -> ``loss/train`` (train and val of a metric share a chart)."""
    if name in EPOCH_METRICS:
        split, metric = split_metric(name)
        return f"{metric}/{split}"
    return {"epoch_time_s": "time/epoch_s"}.get(name, name)


class Logger:
    """Base class: every method is optional. ``run`` is the run folder the logger belongs to."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def start(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Called once before training with the epochs already done (a resumed run's history)."""

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None: ...
    def log_text(self, name: str, text: str) -> None: ...
    def log_image(self, name: str, image: np.ndarray, step: int = 0) -> None:
        """One ``H x W x 3`` uint8 picture."""

    def log_hparams(self, hparams: Mapping[str, Any], final: Mapping[str, float]) -> None: ...
    def log_evaluation(self, name: str, scores: Mapping[str, float], step: int, figures: Mapping[str, Path]) -> None:
        """``evaluate``'s scores of split or folder ``name`` for the checkpoint of epoch ``step``, and its figures."""

    def close(self) -> None: ...


class Loggers(Logger):
    """Several loggers used as one (the ``logger`` config's entries, in order)."""

    def __init__(self, run: RunFolder, loggers: Sequence[Logger] = ()) -> None:
        super().__init__(run)
        self.loggers = list(loggers)

    def start(self, history: Sequence[Mapping[str, Any]]) -> None:
        for lg in self.loggers:
            lg.start(history)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log_epoch(epoch, metrics)

    def log_text(self, name: str, text: str) -> None:
        for lg in self.loggers:
            lg.log_text(name, text)

    def log_image(self, name: str, image: np.ndarray, step: int = 0) -> None:
        for lg in self.loggers:
            lg.log_image(name, image, step)

    def log_hparams(self, hparams: Mapping[str, Any], final: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log_hparams(hparams, final)

    def log_evaluation(self, name: str, scores: Mapping[str, float], step: int, figures: Mapping[str, Path]) -> None:
        for lg in self.loggers:
            lg.log_evaluation(name, scores, step, figures)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def create_loggers(cfg: Mapping[str, Any] | None, run: RunFolder) -> Loggers:
    """The loggers of a ``logger`` config section (entries set to null are left out)."""
    made = [instantiate(node, "logger", _partial_=True)(run=run) for node in (cfg or {}).values() if node is not None]
    return Loggers(run, made)


def rebuilt_loggers(names: Sequence[str], overrides: Sequence[str], run: RunFolder) -> Loggers:
    """The loggers a finished run used, rebuilt from this cellcls's own ``logger`` options of those names (never
    from the run's stored config, which may come from someone else); ``logger.<name>.<key>=<value>`` lines among
    ``overrides`` apply. A name that is no ``logger`` option here is left out with a warning."""
    import logging

    from cellcls.config import compose_config
    from cellcls.paths import config_dir

    options = sorted(p.stem for p in (config_dir() / "logger").glob("*.yaml"))
    known = [n for n in names if n in options]
    for name in sorted(set(names) - set(known)):
        logging.getLogger(__name__).warning("logger %r of the run is not one of this cellcls's logger options (%s): "
                                            "not used", name, ", ".join(options))
    if not known:
        return Loggers(run)
    own = [o for o in overrides if o.split("=", 1)[0].startswith(tuple(f"logger.{n}." for n in known))]
    cfg = compose_config([f"logger=[{','.join(known)}]", *own])
    made: list[Logger] = []
    for name in known:
        try:
            made.append(instantiate(cfg.logger[name], "logger", _partial_=True)(run=run))
        except ConfigError as exc:  # the results are written already: a logger that cannot follow is skipped
            logging.getLogger(__name__).warning("logger %s not used: %s", name, exc)
    return Loggers(run, made)


class CSVLogger(Logger):
    """``metrics.csv``, one row per epoch (rewritten whole each epoch, atomically, so it always matches the
    history); evaluations append a row to ``eval/summary.csv``."""

    def __init__(self, run: RunFolder) -> None:
        super().__init__(run)
        self.rows: list[dict[str, Any]] = []

    def start(self, history: Sequence[Mapping[str, Any]]) -> None:
        self.rows = [dict(r) for r in history]
        if self.rows:
            self._write()

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.rows.append({"epoch": epoch, **metrics})
        self._write()

    def _write(self) -> None:
        write_csv(self.run.metrics, self.rows)

    def log_evaluation(self, name: str, scores: Mapping[str, float], step: int, figures: Mapping[str, Path]) -> None:
        path = self.run.evaluations
        rows: list[dict[str, Any]] = []
        if path.is_file():
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        write_csv(path, [*rows, {"name": name, "epoch": step, **scores}])


class TensorBoardLogger(Logger):
    """Event files under ``<run>/tensorboard``: scalars, images, text and the HParams table."""

    def __init__(self, run: RunFolder) -> None:
        super().__init__(run)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.tensorboard))

    def start(self, history: Sequence[Mapping[str, Any]]) -> None:
        # the Custom Scalars tab draws train and val of each metric in one chart
        pairs: dict[str, list[str]] = {}
        for name in EPOCH_METRICS:
            metric = name.partition("_")[2]
            pairs.setdefault(metric, []).append(tag(name))
        self.writer.add_custom_scalars(
            {"train vs val": {m: ["Multiline", tags] for m, tags in pairs.items() if len(tags) > 1}})

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(tag(key), value, epoch)
        self.writer.flush()

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, "```\n" + text + "\n```")

    def log_image(self, name: str, image: np.ndarray, step: int = 0) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def log_hparams(self, hparams: Mapping[str, Any], final: Mapping[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        # in this run's own event file (SummaryWriter.add_hparams would start a sub-folder per call)
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summary(clean, dict(final)):
            file_writer.add_summary(summary)
        for key, value in final.items():
            self.writer.add_scalar(key, value, 0)
        self.writer.flush()

    def log_evaluation(self, name: str, scores: Mapping[str, float], step: int, figures: Mapping[str, Path]) -> None:
        from cellcls.infra.plots import png_to_array

        for key, value in scores.items():
            if np.isfinite(value):
                self.writer.add_scalar(f"eval_{name}/{key}", value, step)
        for title, path in figures.items():
            self.writer.add_image(f"eval_{name}/{title.replace(' ', '_')}", png_to_array(path), step, dataformats="HWC")
        self.writer.add_text(f"eval_{name}/metrics", "```\n" + json.dumps(dict(scores), indent=2) + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowLogger(Logger):
    """An MLflow run per training run (parameters, per-epoch metrics, figures and texts as artifacts).

    ``tracking_uri`` null: ``$MLFLOW_TRACKING_URI`` if set, else the SQLite store ``mlflow.db`` in the working
    folder with artifacts in ``./mlruns`` (MLflow's own default; view with ``mlflow ui``). The MLflow run id is kept
    in ``<run>/mlflow_run.json``, so a resumed run and ``evaluate`` log into the same MLflow run.
    """

    def __init__(self, run: RunFolder, tracking_uri: str | None, experiment: str, run_name: str | None) -> None:
        super().__init__(run)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError('logger mlflow needs MLflow: pip install "cellcls[mlflow]"') from exc
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
        self.client = MlflowClient(uri)
        if run.mlflow_run.is_file():
            record = json.loads(run.mlflow_run.read_text())
            if record.get("tracking_uri", uri) != uri:  # its run id exists only in the store it was made in
                raise ConfigError(f"the run logged to the MLflow store {record['tracking_uri']}, this command's is {uri}:"
                                  f" set MLFLOW_TRACKING_URI={record['tracking_uri']} to log there")
            self.run_id = record["run_id"]
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=_artifacts_beside(uri))
        created = self.client.create_run(experiment_id, run_name=run_name or run.root.name,
                                         tags={"cellcls.run_dir": str(run.root.resolve())})
        self.run_id = created.info.run_id
        atomic_write(run.mlflow_run, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if np.isfinite(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._metrics(metrics, epoch)

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{name}.txt")

    def log_image(self, name: str, image: np.ndarray, step: int = 0) -> None:
        self.client.log_image(self.run_id, image, f"{name}.png")

    def log_hparams(self, hparams: Mapping[str, Any], final: Mapping[str, float]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in hparams.items()])
        self._metrics({k.replace("hparam/", "final/"): v for k, v in final.items()}, 0)

    def log_evaluation(self, name: str, scores: Mapping[str, float], step: int, figures: Mapping[str, Path]) -> None:
        self._metrics({f"eval_{name}/{k}": v for k, v in scores.items()}, step)
        for path in figures.values():
            self.client.log_artifact(self.run_id, str(path), f"eval/{name}")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _artifacts_beside(uri: str) -> str | None:
    """For a SQLite store, artifacts go in ``mlruns/`` beside the database file (MLflow's own default is the
    working folder, wherever that is); other stores choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return None
