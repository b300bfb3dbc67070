"""The typed config schema: every setting with a fixed shape, its type and its one default.

Registered in Hydra's ConfigStore: ``trainer`` is the dataclass itself (``trainer=default``); each ``dataset/*.yaml``
and ``augment/*.yaml`` extends ``base`` and states only what differs. Hydra checks the types when it composes
(``trainer.max_epochs=abc`` is refused there); :func:`cellcls.config.checks.check_keys` refuses keys no schema
knows, ``+``-added ones included, naming the nearest valid key. Groups whose keys depend on the option chosen
(``model``, ``optim``, ``scheduler``, ``callbacks``, ``logger``) are checked against the code they configure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from cellcls.metric_names import EPOCH_METRICS, MODES


def choice(default: str, allowed: tuple[str, ...]) -> Any:
    """A setting with a closed set of values: the one place they are listed (checked by
    :func:`cellcls.config.checks.check_choices`, read by the code that acts on them)."""
    assert default in allowed, (default, allowed)
    return field(default=default, metadata={"choices": allowed})


PRECISIONS = ("auto", "32", "bf16", "16")
STRATEGIES = ("auto", "ddp", "none")
PIPELINES = ("auto", "device", "loader")
ON_NONFINITE = ("stop", "skip_batch")
SPLIT_BY = ("image", "patient", "duplicates")
LEAKAGE_CHECKS = ("auto", "duplicates", "off")
CHANNELS = ("1", "3")
CLASS_WEIGHTS = ("none", "balanced")
POLICIES = ("none", "randaugment", "trivialaugment")
SAMPLERS = ("uniform", "balanced")
UNCERTAIN = ("ignore", "zeros", "ones")  # CheXpert's -1 ("uncertain"): left out of the loss and metrics, 0 or 1
POS_WEIGHTS = ("balanced", "none")


@dataclass
class TrainerConfig:
    max_epochs: int = 15
    device: str = "auto"  # auto | cpu | cuda | cuda:<index>
    strategy: str = choice("auto", STRATEGIES)  # auto (DDP when started by torchrun) | ddp | none; NCCL on GPUs, gloo on the CPU
    precision: str = choice("auto", PRECISIONS)  # auto (bf16/fp16 autocast on CUDA, float32 on CPU) | 32 | bf16 | 16
    monitor: str = choice("val_loss", EPOCH_METRICS)  # the metric for best.pt, early stopping and the plateau scheduler
    monitor_mode: str = choice("auto", MODES)  # auto (min for losses, max otherwise) | min | max
    # auto (device for cached data) | device: cached uint8 batches converted, augmented and normalised on the
    # training device | loader: DataLoader + per-image torchvision transforms
    pipeline: str = choice("auto", PIPELINES)
    eval_batch_size: Any = "auto"  # auto (4x dataset.batch_size on CUDA, 1x on the CPU) | an integer
    compile: bool = False  # torch.compile the training step (minutes of compilation; pays off on long GPU runs)
    num_threads: Any = "auto"  # CPU threads: auto (OMP_NUM_THREADS if set, else the cores shared among ranks) | n
    channels_last: Any = "auto"  # auto | true | false: NHWC memory layout, ~1.9x faster CNN training on the CPU
    gradient_clip: float | None = None  # max gradient norm, or null
    accumulate_grad_batches: int = 1  # optimiser step every k batches (an effective batch of k x dataset.batch_size)
    # exponential moving average of the weights (e.g. 0.999), validated, checkpointed (best.pt holds it) and
    # exported instead of the raw weights; its decay warms up as min(decay, (1 + n) / (10 + n)) over n updates
    ema_decay: float | None = None
    on_nonfinite: str = choice("stop", ON_NONFINITE)  # a NaN/infinite loss: stop the run (status diverged) | skip_batch (bounded, below)
    max_skipped_batches: int = 10  # skip_batch: more non-finite batches than this in one epoch stop the run
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA; CPU runs are reproducible)
    progress_bar: bool = True
    # a run folder or checkpoint to continue from (its last.pt); auto: this run folder's last.pt when there is one
    # (a requeued job, or hydra.run.dir=<folder> run again), else a fresh start
    resume: str | None = None


@dataclass
class RenderConfig:
    """The synthetic data set's rendering (cellcls.data.synthetic.SyntheticSpec)."""

    train_per_class: int = 500
    test_per_class: int = 100
    size: int = 96
    seed: int = 0
    # false: the two-class cell folders; true: multi-label cells (ring, stippling, target; each present with
    # probability 0.4; 2 x train_per_class training and 2 x test_per_class test images) listed in labels.csv
    multilabel: bool = False


@dataclass
class DuplicatesConfig:
    """How near-duplicate images are found (cellcls.data.duplicates: the audit and dataset.split_by=duplicates)."""

    max_side: int = 256  # images are fingerprinted with their longest side scaled down to this (px)
    keypoints: int = 300  # SIFT keypoints kept per image
    neighbours: int = 20  # candidates checked per image: those with the most similar bags of visual words
    min_similarity: float = 0.05  # candidates below this cosine similarity of their word bags are not checked
    min_inliers: int = 15  # keypoint matches agreeing on one rotation + scale + shift (+ flip) that make a duplicate
    # ... and at least this share of the sparser image's keypoints (X-rays of different patients share anatomy)
    min_inlier_fraction: float = 0.15


@dataclass
class TableConfig:
    """A data set listed in a table (``dataset=csv``; cellcls.data.layouts.table): one row per image."""

    file: str | None = None  # the CSV or Parquet file (absolute, or relative to the working folder or root)
    path: str = "path"  # the column holding each image's path, relative to dataset.root
    # ... or a path built from columns, e.g. "images/{image_id}.jpg" (HAM10000/ISIC metadata name no extension)
    path_template: str | None = None
    label: str = "label"  # the column holding each image's label
    # raw label -> class (e.g. {melanoma: malignant}); a raw label mapped to null drops its rows. Typed Any: a
    # null default lets `dataset.table.label_map={...}` set it from the command line (a typed dict refuses new keys)
    label_map: Any = None
    group: str | None = None  # the column of each image's patient / lesion: grouped splits and intervals
    split: str | None = None  # the column naming each image's split (values as in dataset.splits)
    # multi-label tables (one sigmoid per finding; cellcls.data.findings), either form:
    # the label column lists an image's findings separated by label_sep (ChestX-ray14: "Cardiomegaly|Effusion");
    # no_finding names none (its "No Finding"); the findings are dataset.classes, or those the table names, sorted
    label_sep: str | None = None
    no_finding: str = "No Finding"
    # ... or one column per finding holding 1, 0, blank (= 0: not mentioned) or -1 (CheXpert), the -1 "uncertain"
    # mapped by the `uncertain` policy: ignore (left out of that finding's loss and metrics), zeros or ones
    finding_columns: list[str] | None = None
    uncertain: str = choice("ignore", UNCERTAIN)
    # a multi-label loss weights each finding's positives by negatives / positives of the training split (balanced)
    pos_weight: str = choice("balanced", POS_WEIGHTS)

    @property
    def multilabel(self) -> bool:
        """Whether each row holds several findings rather than one class."""
        return bool(self.label_sep or self.finding_columns)


@dataclass
class DatasetConfig:
    name: str = "folder"
    root: str | None = None  # the unzipped download (or a class-folder tree)
    classes: list[str] | None = None  # null: the training folder's sub-folders, sorted
    class_aliases: dict[str, list[str]] = field(default_factory=dict)  # class -> other folder names for it
    image_size: list[int] = field(default_factory=lambda: [128, 128])  # [height, width] fed to the model
    channels: int = 3  # 3 (RGB) or 1 (greyscale)
    # auto: standardise each channel with the training split's statistics (measured once per run, stored as
    # numbers); null: pixels / 255 only, as the tutorials did; imagenet: the statistics ImageNet-pretrained weights
    # expect (fine-tuning them); or one number per channel
    mean: Any = "auto"
    std: Any = "auto"
    splits: dict[str, list[str]] = field(default_factory=dict)  # folder names per split (any case)
    test_split: str | None = None  # a download with several test folders: which one (blood cells)
    val_fraction: float = 0.15  # held out of train (seeded, stratified) when there is no val folder
    test_fraction: float = 0.0  # held out of train first, when there is no test folder
    split_seed: int | None = None  # seed of the hold-out splits; null: the run's seed
    # image | patient (the group_pattern's id in the file name) | duplicates (near-duplicate clusters: copies of
    # one original photo stay on one side)
    split_by: str = choice("image", SPLIT_BY)
    group_pattern: str | None = None  # regex on the file name whose first group is the patient id
    group_tag: str | None = None  # ... or a DICOM header keyword holding it (PatientID)
    # [centre, width] applied to DICOM pixel values after the modality LUT, instead of the file's own VOI LUT/window
    dicom_window: list[float] | None = None
    # warn at start when val/test share groups with train. auto: patients (group_pattern), and near-duplicate
    # clusters when split_by=duplicates | duplicates: near-duplicates always (every image fingerprinted once,
    # cached) | off
    leakage_check: str = choice("auto", LEAKAGE_CHECKS)
    search_depth: int = 4  # how deep below root to look for the split/class folders
    shuffle: bool = True  # reshuffle the training split every epoch
    # uniform: every training image once per epoch | balanced: draws with replacement, every class equally likely
    # (cellcls.data.sampling; an alternative to class_weights)
    sampler: str = choice("uniform", SAMPLERS)
    batch_size: int = 32
    num_workers: int = 0  # DataLoader worker processes (trainer.pipeline=loader)
    cache: bool = True  # decode and resize each image once into $CELLCLS_CACHE/decoded (memory-mapped)
    render: RenderConfig | None = None  # the synthetic set only
    table: TableConfig | None = None  # dataset=csv only
    file: str | None = None  # dataset=medmnist only: the MedMNIST .npz archive (its splits; written once as PNGs)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)


@dataclass
class CVConfig:
    """Cross-validation (cellcls.training.crossval): ``cv.folds=5`` trains 5 grouped, stratified folds in one run."""

    folds: int = 0  # 0: no cross-validation; k >= 2: k folds of the training (and validation) folders
    fold: int | None = None  # set by the driver for each fold's run (0-based); leave unset


@dataclass
class AugmentConfig:
    """Keras ImageDataGenerator's options, as torchvision v2 runs them (cellcls.data.transforms)."""

    name: str = "none"
    rotation: float = 0.0  # degrees, uniform in [-r, r]
    shift: float = 0.0  # fraction of width/height (Keras width/height_shift_range)
    shear: float = 0.0  # radians, as Keras' shear_range
    zoom: float = 0.0  # scale in [1 - z, 1 + z] (isotropic)
    hflip: bool = False  # p = 0.5
    vflip: bool = False  # p = 0.5
    fill: Any = 0  # constant border fill (0-255), one value or one per channel; Keras' 'nearest' has no v2 equivalent
    # beyond Keras: none | randaugment | trivialaugment (torchvision v2's policies, after the affine and flips; image
    # by image on either pipeline), with randaugment's op count and magnitude (0-30)
    policy: str = choice("none", POLICIES)
    policy_ops: int = 2
    policy_magnitude: int = 9
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha); 0: off. Whole batches, in the training step, on either pipeline
    cutmix: float = 0.0  # CutMix's alpha; 0: off. With mixup too, each batch gets one of the two at random


@dataclass
class ParamGroupsConfig:
    """cellcls' own ``optim`` settings (every ``optim/*.yaml`` extends them; the rest are the optimiser's arguments):
    how parameters are grouped (cellcls.training.optim.param_groups)."""

    backbone_lr_scale: float = 1.0  # the backbone's LR as a share of optim.lr (the classifier head gets optim.lr)
    decay_norm_and_bias: bool = True  # false: no weight decay on biases and normalisation weights


# the top level of the training config, besides the groups, and those of its settings with a closed set of values
TOP_LEVEL = ("seed", "class_weights", "label_smoothing", "calibrate", "operating_point", "conformal", "ood")
TOP_LEVEL_CHOICES = {"class_weights": CLASS_WEIGHTS}
GROUPS = ("dataset", "model", "optim", "scheduler", "augment", "trainer", "logger", "callbacks", "cv")
SCHEMAS: dict[str, type] = {"trainer": TrainerConfig, "cv": CVConfig, "dataset": DatasetConfig, "augment": AugmentConfig,
                            "dataset.render": RenderConfig, "dataset.table": TableConfig,
                            "dataset.duplicates": DuplicatesConfig}


def register() -> None:
    """Put the schema into Hydra's ConfigStore (idempotent; done on importing :mod:`cellcls.config`)."""
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="default", node=TrainerConfig)
    cs.store(group="cv", name="default", node=CVConfig)
    cs.store(group="dataset", name="base", node=DatasetConfig)
    cs.store(group="augment", name="base", node=AugmentConfig)
    # a plain mapping, not the dataclass: each optimiser's file adds its own arguments to it
    cs.store(group="optim", name="base", node=asdict(ParamGroupsConfig()))


T = TypeVar("T")


def typed(node: Any, schema: type[T]) -> T:
    """A config section as its schema's dataclass, the form every function below the command takes: a composed
    section (Hydra built it against the schema), a checkpoint's plain copy of one (merged onto the schema's defaults;
    keys an older cellcls had and this one lacks are left out), or the dataclass itself."""
    if isinstance(node, schema):
        return node
    if OmegaConf.is_config(node) and OmegaConf.get_type(node) is schema:
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    known = {f.name for f in fields(schema)}  # type: ignore[arg-type]
    merged = OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in plain.items() if k in known})
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
