"""``python -m cellcls.train [overrides]``: train one model from the Hydra config in ``configs/``; the command line's
checks before Hydra starts, Hydra's task function, and how a run that did not finish ends the process."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cellcls.cli import check_writable, tolerant_log_files
from cellcls.config import check_command_line
from cellcls.errors import (
    DISK_ERRORS,
    ConfigError,
    DataError,
    TrainingDiverged,
    TrainingInterrupted,
    describe_os_error,
    printable,
)
from cellcls.paths import config_dir
from cellcls.infra.distributed import rank_run_dir
from cellcls.training.run import job_device, train
from cellcls.infra.run_lock import check_run_folder_free

log = logging.getLogger("cellcls.train")


OmegaConf.register_new_resolver("cellcls_rank_dir", rank_run_dir, replace=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    tolerant_log_files()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    if int(os.environ.get("RANK", "0")) > 0 and run_dir.name.startswith("cellcls-rank"):
        atexit.register(shutil.rmtree, run_dir, True)  # a non-zero torchrun rank's throw-away Hydra folder
    if hc.mode == RunMode.MULTIRUN:
        # a failing job is recorded (result.json) and returns NaN (Optuna marks the trial failed); the sweep goes on
        try:
            return float(train(job_device(cfg, hc.job.num), run_dir, overrides)["best"])
        except TrainingInterrupted as exc:  # the user or the scheduler stops the whole sweep
            raise SystemExit(128 + exc.signum) from None
        except TrainingDiverged as exc:
            log.warning("job %s diverged: %s", hc.job.num, exc)
            return float("nan")
        except Exception:
            log.exception("job %s failed", hc.job.num)
            return float("nan")
    try:
        return float(train(cfg, run_dir, overrides)["best"])
    except TrainingInterrupted as exc:
        stop(str(exc), 128 + exc.signum, prefix="cellcls: ")
    except TrainingDiverged as exc:
        stop(str(exc), 3)
    except (ConfigError, DataError, FileNotFoundError, ValueError, ImportError) as exc:  # before OSError: a subclass
        stop(str(exc), 2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        stop(describe_os_error(exc), 2)
    return float("nan")  # not reached: stop() exits


def stop(message: str, code: int, prefix: str = "cellcls: error: ") -> None:
    """End a run that did not finish (its result.json already says why): the log file gets the message, the
    terminal one line."""
    record = logging.LogRecord("cellcls.train", logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:  # train.log, not the console: that gets the line below once
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"{prefix}{printable(message)}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Check the command line's keys (naming the nearest valid key for a typo), then run Hydra."""
    try:
        check_command_line(sys.argv[1:])
        _check_run_folder(sys.argv[1:])
    except ConfigError as exc:
        print(f"cellcls: error: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


def _check_run_folder(argv: Sequence[str]) -> None:
    """Before Hydra writes its own files (its errors would be a traceback and exit 1): the output folder must take a
    file, and a single run's folder must not be held by another run (the lock itself is taken by the run:
    cellcls.infra.run_lock)."""
    if any(a.split("=")[0] in ("--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion")
           for a in argv):
        return  # Hydra prints and writes nothing
    if int(os.environ.get("RANK", "0")) > 0:
        return  # a torchrun rank other than 0 writes nothing there (rank 0 holds the folder)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [v for k, eq, v in (a.partition("=") for a in argv) if eq and k.lstrip("+") == key and "$" not in v]
    folder = Path(given[-1]) if given else Path("outputs")
    check_writable(folder)  # a read-only or full disk is said here, not inside Hydra
    if given and not multirun:
        check_run_folder_free(folder)


if __name__ == "__main__":
    main()
