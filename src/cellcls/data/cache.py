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
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cellcls.data.dataset import load_image
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


def cache_key(samples: Samples, channels: int, size: Sequence[int]) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{channels}|{tuple(size)}".encode())
    for path in samples.paths:
        st = path.stat()
        digest.update(f"\n{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _decode(path: Path, channels: int, size: Sequence[int]) -> np.ndarray | str:
    try:
        return load_image(path, channels, size).numpy()
    except DataError as exc:
        return str(exc.__cause__ or exc)


def decode_split(
    samples: Samples,
    channels: int,
    size: Sequence[int],
    cache_root: Path,
    workers: int | None = None,
    desc: str = "decoding",
    progress: bool = True,
) -> DecodedSplit:
    """Decode ``samples`` into the cache unless an entry for exactly these files and settings exists."""
    key = cache_key(samples, channels, size)
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
        # Pillow releases the GIL while decoding and resizing, so threads scale without pickling pixels
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            results = pool.map(lambda p: _decode(p, channels, size), samples.paths, chunksize=16)
            for i, result in enumerate(tqdm(results, total=len(samples), desc=desc, disable=not progress,
                                            mininterval=1.0, leave=False)):
                if isinstance(result, str):
                    skipped.append((str(samples.paths[i]), result))
                    log.warning("skipping unreadable image %s: %s", samples.paths[i], result)
                else:
                    pixels[i] = result
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
