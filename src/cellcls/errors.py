"""Errors that name the setting or file at fault and what was expected."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class ConfigError(ValueError):
    """A config value is invalid; the message names the setting and the allowed values."""


class DataError(ValueError):
    """A data set on disk does not have the expected layout or content."""


def nearest(key: str, valid: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` for the closest valid name, or nothing when none is close."""
    import difflib

    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def printable(path: object) -> str:
    """A file name fit for any terminal: bytes that are not UTF-8 shown as ``\\udcxx`` escapes."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


class RunFolderInUse(ConfigError):
    """Another training run holds the run folder (its lock names the process and host)."""


class TrainingDiverged(RuntimeError):
    """A loss or the weights became NaN or infinite; the message says where and what to try."""


class TrainingInterrupted(RuntimeError):
    """A signal (SIGTERM, SIGINT, SIGUSR1) stopped training after a step; a resumable checkpoint was written."""

    def __init__(self, message: str, signum: int, chain: object = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.chain = chain  # a handler to pass the signal on to once the status is written (submitit's requeue)

    def pass_on(self) -> None:
        """Hand the signal to the handler that had it before cellcls (submitit requeues the job and exits)."""
        if callable(self.chain):
            self.chain(self.signum, None)


DISK_ERRORS = (28, 30, 13, 1, 122)  # ENOSPC, EROFS, EACCES, EPERM, EDQUOT


WAYS_OUT = "hydra.run.dir=<folder> for a training run, output=<file> for predict and export, CELLCLS_CACHE=<folder> " \
           "for the decoded cache"


def describe_os_error(exc: OSError, need_bytes: int | None = None) -> str:
    """A full, read-only or forbidden folder, said in one line with the folder and, when known, the space needed."""
    import shutil

    named = Path(str(exc.filename)) if exc.filename else None
    where = named if named is not None and named.is_dir() else named.parent if named is not None else Path.cwd()
    if exc.errno in (28, 122):  # no space, quota
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:,.0f} MB free"
        except OSError:
            free = "free space unknown"
        need = f"; about {need_bytes / 2**20:,.0f} MB more are needed" if need_bytes else ""
        return f"no space left to write {named or where} ({free} on the disk holding {where}{need}): free some " \
               f"space or write elsewhere ({WAYS_OUT})"
    return f"cannot write {named or where}: {exc.strerror}; choose a writable folder ({WAYS_OUT})"


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Name ``path`` in a disk error raised while writing it (torch's, numpy's, Pillow's and ONNX's name no file)."""
    try:
        yield
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise
