"""From a ``dataset`` config to data loaders: locate the files, split them, decode once, wrap for training."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cellcls.config.schema import PIPELINES, DatasetConfig, typed
from cellcls.data.batch_augment import BatchAugment
from cellcls.data.cache import DecodedSplit, decode_split
from cellcls.data.dataset import CachedImages, ImageFiles, skip_none_collate
from cellcls.data.decode import decode_image
from cellcls.data.device_loader import DeviceBatches
from cellcls.data.layouts import scan
from cellcls.data.findings import require_both_values
from cellcls.data.leakage import (
    Leak,
    duplicate_clusters,
    find_leaks,
    group_labels,
    warn_leaks,
)
from cellcls.data.normalization import (
    channel_statistics,
    describe,
    is_auto,
    sample_rows,
)
from cellcls.data.preprocessing import Preprocessing
from cellcls.data.reference import training_reference
from cellcls.data.samples import SPLITS, Samples
from cellcls.data.sampling import BalancedSampler
from cellcls.data.splits import cross_validation_fold, stratified_holdout
from cellcls.data.medmnist import ensure_medmnist
from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic
from cellcls.data.transforms import Augment, build_transform, parse_augment
from cellcls.errors import ConfigError, DataError
from cellcls.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Everything the training loop needs to know about the data."""

    root: Path
    classes: list[str]
    splits: dict[str, Samples]
    loaders: dict[str, DataLoader | DeviceBatches]
    preprocessing: Preprocessing
    train_generator: torch.Generator
    ignored: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    train_sampler: DistributedSampler | BalancedSampler | None = None  # torchrun or balanced: set its epoch each epoch

    @property
    def multilabel(self) -> bool:
        """Whether the classes are findings, several per image (a multi-label table)."""
        return self.splits["train"].multilabel


def resolve_root(ds: DatasetConfig | Any) -> Path:
    """The data set's root folder; the synthetic set is rendered into the cache when no root is given, a MedMNIST
    archive copied there as PNG files."""
    ds = typed(ds, DatasetConfig)
    if ds.render is not None and not ds.root:
        return ensure_synthetic(SyntheticSpec(**asdict(ds.render)))
    if ds.file:  # a MedMNIST archive: its PNG copy in the cache
        return ensure_medmnist(Path(str(ds.file)))
    if not ds.root:
        raise ConfigError(
            f"dataset.root is not set: give the folder you unzipped the {ds.name} download to, "
            f"e.g. dataset.root=/data/{ds.name}"
        )
    root = Path(str(ds.root)).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset.root={ds.root!s}: no such folder (expected the unzipped {ds.name} download)")
    return root.resolve()


def fold_of(cfg: DictConfig) -> tuple[int, int] | None:
    """``(fold, folds)`` when ``cfg`` is one fold of a cross-validation (``cv.fold`` set), else None."""
    cv = cfg.get("cv")
    return (int(cv.fold), int(cv.folds)) if cv is not None and cv.fold is not None else None


def make_splits(
    ds: DatasetConfig | Any, scanned: dict[str, Samples], classes: list[str], seed: int, progress: bool = True,
    fold: tuple[int, int] | None = None,
) -> tuple[dict[str, Samples], list[Leak]]:
    """Train/val/test samples from the ``scanned`` splits, and what the held-out splits share with training.

    A download's own splits are used where present, else seeded stratified hold-outs from the training split
    (``test_fraction`` first, then ``val_fraction``), keeping each patient (``split_by=patient``) or each
    near-duplicate cluster (``split_by=duplicates``) on one side. With ``fold=(k, K)`` the test split is fold k of a
    K-fold split of the training (and validation) images instead; a download's own test split is left out.
    """
    ds = typed(ds, DatasetConfig)
    scanned = dict(scanned)
    check = str(ds.leakage_check)
    clusters = None
    if ds.split_by == "duplicates" or (check == "duplicates"):
        clusters = duplicate_clusters(scanned, ds, progress)
    if fold is not None:
        pool = scanned["train"] + scanned["val"] if "val" in scanned else scanned["train"]
        scanned = {"train": pool}
        scanned["train"], scanned["test"] = cross_validation_fold(
            pool, fold[1], fold[0], seed, classes, group_labels(pool, ds, clusters))
    for split, fraction, offset in (("test", ds.test_fraction, 0), ("val", ds.val_fraction, 1)):
        if split not in scanned and (split == "val" or fraction > 0):
            train = scanned["train"]
            groups = group_labels(train, ds, clusters)
            scanned["train"], scanned[split] = stratified_holdout(train, float(fraction), seed + offset, groups)
    splits = {name: scanned[name] for name in SPLITS if name in scanned}
    leaks = find_leaks(splits, ds, clusters) if check != "off" else []
    return splits, leaks


def _require_every_class(samples: Samples, classes: list[str], split: str) -> None:
    if samples.targets is not None:
        require_both_values(samples.targets, classes, split)
        return
    counts = Counter(samples.labels)
    empty = [c for i, c in enumerate(classes) if counts[i] == 0]
    if empty:
        raise DataError(f"the {split} split has no readable images of class(es) {empty}")


def _training_statistics(
    train: Samples, decoded: DecodedSplit | None, prep: Preprocessing
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images: all of them from the cache, else a decoded sample."""
    if decoded is not None:
        return channel_statistics(np.load(decoded.file, mmap_mode="r"), decoded.kept)
    pixels = []
    for i in sample_rows(len(train)):
        try:
            pixels.append(decode_image(train.paths[i], prep.channels, prep.image_size, window=prep.window))
        except DataError:
            continue  # reported when training reaches it
    if not pixels:
        raise DataError("dataset.mean=auto: no training image could be decoded")
    return channel_statistics(np.stack(pixels), range(len(pixels)))


def resolve_pipeline(setting: str, cached: bool) -> str:
    """``trainer.pipeline``: auto means the device pipeline for cached data, the DataLoader otherwise."""
    if setting not in PIPELINES:
        raise ConfigError(f"trainer.pipeline={setting!r} is not valid; allowed values: {', '.join(PIPELINES)}")
    if setting == "device" and not cached:
        raise ConfigError("trainer.pipeline=device reads the decoded cache: it needs dataset.cache=true")
    return "device" if setting == "auto" and cached else ("loader" if setting == "auto" else setting)


def build_data(
    ds: DatasetConfig | Any,
    augment: Any | None,
    seed: int,
    device: torch.device,
    pipeline: str = "auto",
    eval_batch_size: int | None = None,
    shard: tuple[int, int] | None = None,
    fold: tuple[int, int] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> DataBundle:
    """Locate, split, decode (once, cached) and wrap the data set ``ds``; only the training split is augmented.

    ``pipeline`` (``trainer.pipeline``) picks how batches reach ``device``: ``device`` gathers uint8 rows of the
    cache and converts, augments and normalises them there in batches; ``loader`` is a DataLoader applying
    torchvision transforms image by image (the only choice for uncached data). Validation and test batches hold
    ``eval_batch_size`` images (default: ``dataset.batch_size``). With ``shard=(world_size, rank)`` (torchrun) the
    training split is drawn through a DistributedSampler: each process trains on its share of every epoch. With
    ``fold=(k, K)`` the splits are those of cross-validation fold k (see :func:`make_splits`).
    """
    ds = typed(ds, DatasetConfig)  # a composed section is parsed once, here; a DatasetConfig is taken as it is
    root = resolve_root(ds)
    scanned = scan(ds, root)
    classes = scanned.classes
    splits, leaks = make_splits(ds, scanned.splits, classes, seed if ds.split_seed is None else int(ds.split_seed),
                                fold=fold)
    warn_leaks(leaks)
    prep = Preprocessing.from_config(ds)
    mode = resolve_pipeline(str(pipeline), bool(ds.cache))
    decoded = _decode(splits, prep, check_stop) if ds.cache else {}
    skipped = list(scanned.missing) + [s for d in decoded.values() for s in d.skipped]
    splits = {name: samples.subset(decoded[name].kept) if name in decoded else samples
              for name, samples in splits.items()}
    if is_auto(ds.mean):
        prep = prep.with_statistics(*_training_statistics(splits["train"], decoded.get("train"), prep))
        log.info("input normalisation (training split statistics): %s", describe(prep.mean, prep.std))
    prep = prep.with_reference(training_reference(splits["train"], decoded.get("train"), prep))
    generator = torch.Generator().manual_seed(seed)
    make = _Loaders(ds, prep, mode, device, generator, seed, shard, eval_batch_size,
                    parse_augment(augment) if augment is not None else None, classes)
    loaders = {}
    for name, samples in splits.items():
        _require_every_class(samples, classes, name)
        loaders[name] = make(name, samples, decoded.get(name))
    return DataBundle(root, classes, splits, loaders, prep, generator, scanned.ignored, skipped, make.train_sampler)


def _decode(splits: dict[str, Samples], prep: Preprocessing, check_stop: Callable[[], None] | None,
            ) -> dict[str, DecodedSplit]:
    """Every split into the decoded cache first: ``auto`` normalisation needs the training split's pixels."""
    decoded = {}
    for name, samples in splits.items():
        decoded[name] = decode_split(samples, prep.channels, prep.image_size, cache_dir(),
                                     desc=f"decoding {name} (first use)", window=prep.window, check_stop=check_stop)
        if decoded[name].decoded:
            log.info("decoded %d %s images into the cache %s", decoded[name].decoded, name, decoded[name].file.parent)
    return decoded


@dataclass
class _Loaders:
    """Makes each split's batches: device-side batches of the cache, or a DataLoader with per-image transforms; only
    the training split is augmented, shuffled and (under torchrun) sharded."""

    ds: DatasetConfig
    prep: Preprocessing
    mode: str
    device: torch.device
    generator: torch.Generator
    seed: int
    shard: tuple[int, int] | None
    eval_batch_size: int | None
    augment: Augment | None
    classes: list[str] = field(default_factory=list)
    train_sampler: DistributedSampler | BalancedSampler | None = None

    def __call__(self, name: str, samples: Samples, decoded: DecodedSplit | None) -> DataLoader | DeviceBatches:
        train = name == "train"
        aug = self.augment if train else None
        batch_size = int(self.ds.batch_size) if train or not self.eval_batch_size else int(self.eval_batch_size)
        sampler = None
        if train and self.ds.sampler == "balanced":
            if samples.multilabel:
                raise ConfigError("dataset.sampler=balanced evens out classes; a multi-label image has several, so it "
                                  "does not apply (the loss' per-finding pos_weight, dataset.table.pos_weight, does)")
            if not self.ds.shuffle:
                raise ConfigError("dataset.sampler=balanced draws the training images at random; it cannot keep "
                                  "dataset.shuffle=false's fixed order (set dataset.shuffle=true)")
            sampler = self.train_sampler = BalancedSampler(samples.labels, self.classes, self.seed, self.shard)
        elif train and self.shard is not None:
            sampler = self.train_sampler = DistributedSampler(
                range(len(samples)), num_replicas=self.shard[0], rank=self.shard[1], shuffle=bool(self.ds.shuffle),
                seed=self.seed)
        # BatchNorm cannot train on a batch of one image (one value per channel once pooled to 1x1): such a last
        # batch is dropped; with shuffling a different image sits it out each epoch
        count = len(sampler) if sampler is not None else len(samples)  # this rank's share under torchrun
        drop_last = train and count > batch_size and count % batch_size == 1
        shuffle = train and bool(self.ds.shuffle)
        if self.mode == "device":
            assert decoded is not None, "device batches read the decoded cache"
            return DeviceBatches(decoded.file, decoded.kept, samples.training_targets(), batch_size, self.device,
                                 augment=BatchAugment(aug) if aug else None, mean=self.prep.mean, std=self.prep.std,
                                 shuffle=shuffle, generator=self.generator if train else None, sampler=sampler,
                                 drop_last=drop_last)
        transform = build_transform(aug, self.prep.mean, self.prep.std)
        dataset: Dataset = (CachedImages(decoded.file, decoded.kept, samples.training_targets(), transform) if decoded is not None
                            else ImageFiles(samples, self.prep.channels, self.prep.image_size, transform,
                                            self.prep.window))
        workers = int(self.ds.num_workers)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                          generator=self.generator if train and sampler is None else None, sampler=sampler,
                          drop_last=drop_last, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, collate_fn=None if decoded is not None else skip_none_collate)
