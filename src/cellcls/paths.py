"""Where cellcls finds its configs and keeps its caches."""

from __future__ import annotations

import os
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
