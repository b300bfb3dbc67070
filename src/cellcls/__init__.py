"""cellcls: configurable PyTorch training for medical cell and X-ray image classification.

``cellcls.train(overrides)`` trains like ``python -m cellcls.train``; ``cellcls.load(run_or_file).predict(images)``
classifies images with a trained model (see :mod:`cellcls.api`); ``cellcls.register_target(cls, section)`` lets a
config create a callback or logger class of your own (:mod:`cellcls.config.targets`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "register_target", "train"]


def __getattr__(name: str) -> Any:
    # imported on first use: `python -m cellcls.<tool>` should not pay for torch and Hydra twice over
    if name in ("train", "load"):
        from cellcls import api

        return getattr(api, name)
    if name == "register_target":
        from cellcls.config.targets import register_target

        return register_target
    raise AttributeError(f"module 'cellcls' has no attribute {name!r}")
