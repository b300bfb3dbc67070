"""One training run per run folder: a lock held for the run's life.

The lock is an ``flock`` on ``<run>/.run.lock``, so the kernel releases it when the process ends however it ends
(SIGKILL included): a stale lock cannot outlive its run on a local disk. The file names the holder (process, host,
start time) for the refusal message. Where the file system has no ``flock`` (some network mounts), the holder record
decides: a process on this host that no longer runs left a stale lock, which is taken over; one on another host is
trusted to be alive and the message says how to clear it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cellcls.errors import ConfigError, RunFolderInUse
from cellcls.processes import pid_running
from cellcls.infra.run_folder import RunFolder

log = logging.getLogger("cellcls.train")

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(run_dir: Path, holder: dict) -> str:
    who = f"process {holder.get('pid', '?')} on {holder.get('host', 'an unknown host')}"
    since = f", started {holder['started']}" if holder.get("started") else ""
    return (f"run folder {run_dir} is in use by another training run ({who}{since}); wait for it to finish, or give "
            "this run its own folder (hydra.run.dir=<folder>)")


def _alive(holder: dict) -> bool:
    """Whether the process a lock record names may still run (another host's cannot be checked: assume so)."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        return pid_running(int(holder["pid"]))
    except (KeyError, ValueError, TypeError):
        return True


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs; raise :class:`RunFolderInUse` naming the holder if another run
    has it. Creates the folder."""
    path = RunFolder(run_dir).lock
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"run folder {run_dir}: cannot open its lock file {path} ({exc.strerror}); remove it if it "
                          "is not a file, or give this run another folder (hydra.run.dir=<folder>)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderInUse(_describe(run_dir, _holder(path))) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            holder = _holder(path)
            if holder.get("pid") != os.getpid() and _alive(holder):
                raise RunFolderInUse(_describe(run_dir, holder) + f"; if it is not running, delete {path}") from None
            if holder:
                log.warning("run folder %s: taking over the lock of process %s on %s, which no longer runs",
                            run_dir, holder.get("pid"), holder.get("host"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (unlinking it would let two later runs lock two files)


def check_run_folder_free(run_dir: Path) -> None:
    """Refuse at once if a training run holds ``run_dir`` (before Hydra writes its files there); takes nothing."""
    path = RunFolder(run_dir).lock
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderInUse(_describe(run_dir, _holder(path))) from None
    except OSError:
        return  # no flock here: run_folder_lock decides with the holder record
    finally:
        os.close(fd)
