"""Where cellcls finds its configs and keeps its caches."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The primary Hydra config folder: inside the package when installed from a wheel, else the repo's ``configs/``."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parents[1] / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"cellcls configs not found in {_PACKAGE / 'configs'} or {_PACKAGE.parents[1] / 'configs'}; reinstall the package"
    )


def cache_dir() -> Path:
    """Root of cellcls' caches: ``$CELLCLS_CACHE``, else ``$XDG_CACHE_HOME/cellcls``, else ``~/.cache/cellcls``."""
    if os.environ.get("CELLCLS_CACHE"):
        return Path(os.environ["CELLCLS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cellcls"


def build_once(root: Path, marker: str, fill: Callable[[Path], None]) -> Path:
    """``root``, built by ``fill(folder)`` in a temporary sibling folder and moved into place in one step, unless
    ``root/marker`` (which ``fill`` writes last) already marks a complete copy. Two processes racing to build it
    are fine: the loser's identical copy is dropped."""
    if (root / marker).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
