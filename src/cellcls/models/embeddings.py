"""A backbone's embeddings of a split's images (the pooled features before the classifier), computed once and
cached by what determines them: the starting weights' checksum, the architecture, the preprocessing, the flips
averaged and every file's path, size and modification time.

The cache lives in ``$CELLCLS_CACHE/embeddings/<key>.npy`` (written atomically); a changed file, other weights or
another input size make a new key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellcls.data.preprocessing import Preprocessing
from cellcls.models.tta import TTA_VIEWS
from cellcls.infra.run_folder import atomic_write

log = logging.getLogger(__name__)


def pooled_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm model's pooled features, what its classifier sees (``forward_head(..., pre_logits=True)``)."""
    return net.forward_head(net.forward_features(x), pre_logits=True)


@torch.inference_mode()
def embed(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], flips: str = "none",
          device: torch.device | str = "cpu") -> np.ndarray:
    """``N x D`` float32 embeddings of the normalised batches, averaged over the image and its ``flips`` (a linear
    head on the average is the average of the head's logits, which is what ``model.tta`` then applies)."""
    net.eval()
    out = []
    for x, _ in batches:
        x = x.to(device)
        feats = pooled_features(net, x)
        for dims in TTA_VIEWS[flips]:
            feats = feats + pooled_features(net, torch.flip(x, dims))
        out.append((feats / (len(TTA_VIEWS[flips]) + 1)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def cache_key(weights_sha256: str, arch: str, preprocessing: Preprocessing, flips: str, files: Iterable[Path]) -> str:
    """The key of a split's embeddings: everything that changes them."""
    stored = preprocessing.to_dict()  # lists, as the cache's keys always hashed them
    recipe = {k: stored[k] for k in ("image_size", "channels", "mean", "std", "window", "resize")}
    stamps = []
    for f in files:
        st = Path(f).stat()
        stamps.append([str(f), st.st_size, st.st_mtime_ns])
    text = json.dumps({"weights": weights_sha256, "arch": arch, "recipe": recipe, "flips": flips, "files": stamps},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def cached_embeddings(folder: Path, key: str, compute: Any) -> tuple[np.ndarray, bool]:
    """The embeddings under ``key`` in ``folder``, computing and storing them with ``compute()`` on a miss;
    returns (embeddings, whether they came from the cache). An unreadable entry is recomputed."""
    path = folder / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False), True
        except (OSError, ValueError) as exc:
            log.warning("embedding cache %s is unreadable (%s): computing it again", path, exc)
    values = np.ascontiguousarray(compute(), dtype=np.float32)
    atomic_write(path, lambda fh: np.save(fh, values, allow_pickle=False))
    return values, False
