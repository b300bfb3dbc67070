"""``python -m cellcls.tune search=<name or file> [trials=<n>] [jobs=<k>] [storage=<url or journal file>] [output=<dir>] [training overrides]``

Searches hyper-parameters with Optuna. ``search`` names a file in ``configs/hparams_search/`` (or a path): the
study name, the number of trials, the sampler (TPE), the pruner (median, hyperband or none) and the search space.
Every other ``key=value`` is a training override, as for ``python -m cellcls.train`` (e.g. ``dataset.root=<dir>``).
Each trial is an ordinary run in ``<output>/trials/<number>/``; the pruner stops unpromising ones after an epoch.
The study lives in ``<output>`` (default ``outputs/tune/<study>``; ``study.db``, SQLite): the same command resumes
it, ``jobs=<k>`` runs k worker processes on it, and ``storage=<file>.log`` (a journal file) lets processes on several
machines (SLURM array jobs) share one study. At the end: ``summary.csv``/``summary.md`` (best first), Optuna's plots
as PNGs, and ``configs/experiment/best.yaml``, run with ``python -m cellcls.train --config-dir <output>/configs
experiment=best``. Other settings: study=<name>, pruner=median|hyperband|threshold|none (with Optuna's defaults).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.cli import command_args, fail, log_like_training, split_own, whole_number
from cellcls.errors import ConfigError, DataError, printable

OWN = ("search", "trials", "jobs", "storage", "output", "study", "pruner", "worker")


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    own, overrides = split_own(args, OWN)
    log_like_training()
    try:
        import optuna  # noqa: F401 - the sweep extra; said plainly when missing
    except ImportError:
        return fail(ImportError('python -m cellcls.tune needs Optuna: pip install "cellcls[sweep]"'))
    from cellcls.config import check_command_line
    from cellcls.training.study import SearchInterrupted, Study, run_trials, spawn_workers
    from cellcls.training.tune import PRUNERS, load_search

    workers = []
    try:
        if "search" not in own:
            raise ConfigError("search=<name or file> is required: a search space in configs/hparams_search/")
        spec = load_search(own["search"])
        spec.study = own.get("study", spec.study)
        if own.get("pruner", spec.pruner.get("name")) != spec.pruner.get("name"):
            if own["pruner"] not in PRUNERS:
                raise ConfigError(f"pruner={own['pruner']} is not valid; allowed values: {', '.join(PRUNERS)}")
            spec.pruner = {"name": own["pruner"]}  # the named pruner with Optuna's defaults
        spec.trials = whole_number("trials", own.get("trials", spec.trials), 1)
        jobs, worker = whole_number("jobs", own.get("jobs", 1), 1), whole_number("worker", own.get("worker", 0), 0)
        check_command_line([*spec.overrides, *overrides])
        study = Study(spec, overrides, Path(own.get("output", f"outputs/tune/{spec.study}")), own.get("storage"))
        study.open()  # created once, before any worker races to create it
        if worker == 0 and jobs > 1:
            workers = spawn_workers(args, jobs)
            if any(code != 0 for code in [proc.wait() for proc in workers]):
                raise ConfigError("a worker process failed (its error is above); the study keeps what finished")
        else:
            run_trials(study, worker)
        if worker == 0:
            from cellcls.training.study import report

            print(report(study))
    except SearchInterrupted as exc:
        for proc in workers:
            proc.terminate()
        print(f"cellcls: {printable(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        for proc in workers:
            proc.terminate()
        return 130
    except (ConfigError, DataError, OSError, ValueError) as exc:
        for proc in workers:
            proc.terminate()
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
