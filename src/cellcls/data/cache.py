"""The decoded-image cache: each split decoded and resized once, then memory-mapped by every epoch and run.

A cache entry is ``<cache>/decoded/<key>/images.npy`` (``N x C x H x W`` uint8) plus ``index.json``. The key
hashes the file list with each file's size and modification time, the target size and the channel count, so a
changed, added or removed file gives a new entry. Entries are written to a temp folder and renamed into place.
Clear the cache by deleting ``<cache>/decoded`` (see ``cellcls.paths.cache_dir``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cellcls.data.decode import decode_image, decode_rows, max_pixels
from cellcls.data.samples import Samples
from cellcls.errors import DataError
from cellcls.processes import pid_running

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class DecodedSplit:
    """Where a split's pixels are, which of its samples decoded, and what was skipped."""

    file: Path
    kept: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0  # images decoded by this call: 0 when the cache was reused


def file_list_key(paths: Sequence[Path], settings: str) -> str:
    """A cache key for these files as they are on disk now (each one's size and modification time) and
    ``settings``: a changed, added or removed file, or other settings, give a new key."""
    digest = hashlib.sha1(settings.encode())
    for path in paths:
        st = path.stat()
        # os.fsencode: a name need not be valid UTF-8 (any bytes but / and NUL), so hash the bytes on disk
        digest.update(b"\n" + os.fsencode(path.resolve()) + f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def cache_key(samples: Samples, channels: int, size: Sequence[int], window: Sequence[float] | None = None) -> str:
    # a configured DICOM window changes the pixels; without one the key is what it always was
    extra = f"|window={[float(v) for v in window]}" if window is not None else ""
    return file_list_key(samples.paths, f"v{CACHE_VERSION}|{channels}|{tuple(size)}|{max_pixels()}{extra}")


# Below this many images threads are enough; above it, worker processes (Pillow's PNG reader parses chunks in
# Python and holds the GIL for part of every image, so threads stop scaling at about 1.4 cores).
PROCESS_POOL_MIN_IMAGES = 256
CHUNK = 64


def _decode_all(
    file: Path, pixels: np.ndarray, samples: Samples, channels: int, size: Sequence[int], workers: int,
    window: Sequence[float] | None = None,
) -> Iterator[tuple[int, str | None]]:
    """Decode every sample into its row of ``pixels`` (the memmap of ``file``), yielding (row, error or None)
    in order as rows finish."""
    n = len(samples)
    if workers > 1 and n >= PROCESS_POOL_MIN_IMAGES and "fork" in mp.get_all_start_methods():
        pixels.flush()
        # fork: a spawned worker would re-import the caller's __main__ (torch, Hydra) before decoding anything;
        # the workers only run Pillow and NumPy, which are safe after fork
        jobs = [[(i, str(samples.paths[i])) for i in range(start, min(start + CHUNK, n))] for start in range(0, n, CHUNK)]
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                   initializer=_worker_start, initargs=(os.getpid(),))
        try:
            for done in pool.map(decode_rows, repeat(str(file)), jobs, repeat(channels), repeat(list(size)),
                                 repeat(window)):
                yield from done
        finally:  # stopped early (a signal, an error): the chunks not started are dropped, not decoded
            pool.shutdown(wait=True, cancel_futures=True)
        return
    # Pillow releases the GIL while decoding and resizing; each thread writes its row itself
    threads = ThreadPoolExecutor(max_workers=workers)
    try:
        yield from zip(range(n), threads.map(lambda i: _decode_into(pixels, i, samples.paths[i], channels, size, window),
                                             range(n)))
    finally:
        threads.shutdown(wait=True, cancel_futures=True)


def _worker_start(parent: int) -> None:
    """A decode worker dies with the process that started it (even a SIGKILLed one: Linux's parent-death signal)
    and leaves SIGINT/SIGTERM to it, which stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends the workers
        pass
    if os.getppid() != parent:  # the parent died before the signal was set up
        os._exit(1)


def _decode_into(
    pixels: np.ndarray, i: int, path: Path, channels: int, size: Sequence[int], window: Sequence[float] | None
) -> str | None:
    """Decode image ``i`` straight into its row of the cache; the reason when it cannot be read."""
    try:
        pixels[i] = decode_image(path, channels, size, window=window)
    except DataError as exc:
        return str(exc.__cause__ or exc)
    return None


def decode_split(
    samples: Samples,
    channels: int,
    size: Sequence[int],
    cache_root: Path,
    workers: int | None = None,
    desc: str = "decoding",
    progress: bool = True,
    window: Sequence[float] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> DecodedSplit:
    """Decode ``samples`` into the cache unless an entry for exactly these files and settings exists.
    ``check_stop`` is called as rows finish; what it raises (a signal's stop) ends the decoding, the half-written
    entry removed."""
    key = cache_key(samples, channels, size, window)
    base = cache_root / "decoded"
    entry = base / key
    index = entry / "index.json"
    height, width = (int(s) for s in size)
    if index.is_file():
        meta = _intact(entry, (len(samples), channels, height, width))
        if meta is not None:
            return DecodedSplit(entry / "images.npy", meta["kept"], [tuple(s) for s in meta["skipped"]], 0)

    base.mkdir(parents=True, exist_ok=True)
    remove_abandoned(base)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.pid{os.getpid()}.", dir=base))
    rows = None
    try:
        try:
            pixels = np.lib.format.open_memmap(
                tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(samples), channels, height, width)
            )
        except OSError as exc:  # numpy's own errors name no file
            exc.filename = exc.filename or str(tmp / "images.npy")
            raise
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []
        rows = _decode_all(tmp / "images.npy", pixels, samples, channels, size, workers or os.cpu_count() or 1, window)
        for i, error in tqdm(rows, total=len(samples), desc=desc, disable=not progress, mininterval=1.0, leave=False):
            if check_stop is not None:
                check_stop()
            if error is not None:
                skipped.append((str(samples.paths[i]), error))
                log.warning("skipping unreadable image %s: %s", samples.paths[i], error)
            else:
                kept.append(i)
        pixels.flush()
        del pixels
        meta = {"version": CACHE_VERSION, "count": len(samples), "channels": channels, "size": [height, width],
                "kept": kept, "skipped": skipped}
        (tmp / "index.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, entry)
        except OSError:  # a concurrent run wrote the same entry first
            pass
    finally:
        if rows is not None:
            rows.close()  # the worker pool ends here, before its folder goes
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DecodedSplit(entry / "images.npy", kept, skipped, len(samples))


def _intact(entry: Path, shape: tuple[int, ...]) -> dict | None:
    """The entry's index when its pixel file is whole; else None, after removing the entry (it is rebuilt)."""
    try:
        meta = json.loads((entry / "index.json").read_text())
        pixels = np.load(entry / "images.npy", mmap_mode="r")
        ok = tuple(pixels.shape) == shape and meta.get("count") == shape[0]
        del pixels
    except (OSError, ValueError, KeyError) as exc:  # a truncated file: "mmap length is greater than file size"
        ok, why = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        why = "its shape differs from its index"
    if ok:
        return meta
    log.warning("the cache entry %s is damaged (%s); decoding it again", entry, why)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def remove_abandoned(base: Path) -> None:
    """Remove the half-written entries of decoding processes that were killed (their PID no longer runs)."""
    for tmp in base.glob(".*.pid*.*"):
        pid = tmp.name.split(".pid", 1)[1].split(".", 1)[0]
        if not pid.isdigit() or pid_running(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("removed %s, left by a decoding process that was stopped", tmp)
