"""The decoded-image cache: each split decoded and resized once, then memory-mapped by every epoch and run.

A cache entry is ``<cache>/decoded/<key>/images.npy`` (``N x C x H x W`` uint8) plus ``index.json``. The key
hashes the file list with each file's size and modification time, the target size and the channel count, so a
changed, added or removed file gives a new entry. Entries are written to a temp folder and renamed into place.
Clear the cache by deleting ``<cache>/decoded`` (see ``cellcls.paths.cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cellcls.data.decode import decode_image, decode_rows, max_pixels
from cellcls.data.layout import Samples
from cellcls.errors import DataError

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
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
            for done in pool.map(decode_rows, repeat(str(file)), jobs, repeat(channels), repeat(list(size)),
                                 repeat(window)):
                yield from done
        return
    # Pillow releases the GIL while decoding and resizing; each thread writes its row itself
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from zip(range(n), pool.map(lambda i: _decode_into(pixels, i, samples.paths[i], channels, size, window),
                                          range(n)))


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
) -> DecodedSplit:
    """Decode ``samples`` into the cache unless an entry for exactly these files and settings exists."""
    key = cache_key(samples, channels, size, window)
    base = cache_root / "decoded"
    entry = base / key
    index = entry / "index.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        return DecodedSplit(entry / "images.npy", meta["kept"], [tuple(s) for s in meta["skipped"]], 0)

    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
    height, width = (int(s) for s in size)
    try:
        pixels = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(samples), channels, height, width)
        )
        kept: list[int] = []
        skipped: list[tuple[str, str]] = []
        rows = _decode_all(tmp / "images.npy", pixels, samples, channels, size, workers or os.cpu_count() or 1, window)
        for i, error in tqdm(rows, total=len(samples), desc=desc, disable=not progress, mininterval=1.0, leave=False):
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
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DecodedSplit(entry / "images.npy", kept, skipped, len(samples))
