"""Checkpoints: written atomically, read back with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "cellcls-checkpoint/1"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` through a temp file and a rename, so a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from the user's group
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_checkpoint(location: str | Path, name: str = "last.pt") -> Path:
    """A checkpoint file from a file path or a run folder (``<run>/checkpoints/<name>``)."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / name
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a .pt file or a run folder holding checkpoints/{name})")
    return path


def load_checkpoint(location: str | Path, name: str = "last.pt") -> dict[str, Any]:
    """Load a cellcls checkpoint safely (tensors and plain containers only, no pickled code)."""
    path = resolve_checkpoint(location, name)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cellcls checkpoint (expected format {FORMAT})")
    payload["path"] = str(path)
    return payload
