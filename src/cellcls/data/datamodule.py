"""From a ``dataset`` config to data loaders: locate the files, split them, and wrap them for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cellcls.data.dataset import ImageFiles
from cellcls.data.layout import Samples, scan_split
from cellcls.data.splits import stratified_holdout
from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic
from cellcls.data.transforms import build_transform
from cellcls.errors import ConfigError, DataError


@dataclass
class DataBundle:
    """Everything the training loop needs to know about the data."""

    root: Path
    classes: list[str]
    splits: dict[str, Samples]
    loaders: dict[str, DataLoader]
    preprocessing: dict[str, Any]
    train_generator: torch.Generator
    ignored: list[Path] = field(default_factory=list)


def resolve_root(ds: DictConfig) -> Path:
    """The data set's root folder; the synthetic set is rendered into the cache when no root is given."""
    if ds.get("render") is not None and not ds.get("root"):
        return ensure_synthetic(SyntheticSpec(**OmegaConf.to_container(ds.render)))
    if not ds.get("root"):
        raise ConfigError(f"dataset.root is not set: give the folder you unzipped the {ds.name} download to, e.g. dataset.root=/data/{ds.name}")
    root = Path(str(ds.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root={ds.root!s}: no such folder (expected the unzipped {ds.name} download)")
    return root.resolve()


def preprocessing_of(ds: DictConfig) -> dict[str, Any]:
    """What a model trained on ``ds`` expects of an input image; stored in checkpoints."""
    return {
        "image_size": [int(s) for s in ds.image_size],
        "channels": int(ds.channels),
        "mean": list(ds.mean) if ds.get("mean") is not None else None,
        "std": list(ds.std) if ds.get("std") is not None else None,
        "resize": "bilinear",
        "scale": "1/255",
    }


def _split_samples(ds: DictConfig, root: Path, seed: int) -> tuple[dict[str, Samples], list[Path]]:
    """Train/val/test samples: folder splits where the layout has them, else a seeded stratified hold-out."""
    classes = list(ds.classes)
    folders = ds.splits
    scanned = {name: scan_split(root / folders[name], classes) for name in ("train", "val", "test") if folders.get(name)}
    ignored = [p for s in scanned.values() for p in s.ignored]
    if "val" not in scanned:
        scanned["train"], scanned["val"] = stratified_holdout(scanned["train"], float(ds.val_fraction), seed)
    return {name: scanned[name] for name in ("train", "val", "test") if name in scanned}, ignored


def build_data(ds: DictConfig, augment: DictConfig | None, seed: int, device: torch.device) -> DataBundle:
    """Locate, split and wrap the data set ``ds``; only the training split is augmented."""
    root = resolve_root(ds)
    splits, ignored = _split_samples(ds, root, seed)
    prep = preprocessing_of(ds)
    batch_size = int(ds.batch_size)
    workers = int(ds.get("num_workers", 0))
    generator = torch.Generator().manual_seed(seed)
    loaders = {}
    for name, samples in splits.items():
        train = name == "train"
        aug = OmegaConf.to_container(augment) if (train and augment is not None) else None
        dataset = ImageFiles(samples, prep["channels"], prep["image_size"], build_transform(aug, prep["mean"], prep["std"]))
        loaders[name] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            generator=generator if train else None,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )
    return DataBundle(root, list(ds.classes), splits, loaders, prep, generator, ignored)
