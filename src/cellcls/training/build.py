"""Everything a training job is made of, built from the composed config: runtime, data, model, loss, optimiser,
LR scheduler, grad scaler, EMA and batch mixing. The callbacks and loggers are the fit loop's
(:mod:`cellcls.training.fit`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cellcls.config.schema import DatasetConfig, TrainerConfig, typed
from cellcls.data.datamodule import DataBundle, build_data, fold_of
from cellcls.data.mixing import BatchMix, build_mix
from cellcls.data.normalization import describe, follow_weights
from cellcls.data.transforms import parse_augment
from cellcls.metric_names import metric_mode
from cellcls.models import build_model, starting_statistics
from cellcls.scoring.heads import num_outputs
from cellcls.infra.run_folder import RunFolder
from cellcls.infra import distributed
from cellcls.training.ema import EMA
from cellcls.training.loop import TrainStep
from cellcls.errors import ConfigError
from cellcls.scoring.losses import ClassificationLoss, MultiLabelLoss, balanced_class_weights, positive_weights
from cellcls.training.optim import Scheduler, build_optimizer, build_scheduler
from cellcls.infra.runtime import (
    Runtime,
    eval_batch_size,
    seed_everything,
    setup_runtime,
)

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One training job's parts. ``net`` is the plain network; ``model`` what the training step calls (``net``, or
    its DDP / ``torch.compile`` wrapper); ``ema`` the weights' moving average when ``trainer.ema_decay`` is set;
    ``mix`` MixUp/CutMix of whole training batches. ``trainer`` is the config's trainer section, parsed once here;
    the fit loop reads it, never ``cfg.trainer``."""

    cfg: DictConfig
    trainer: TrainerConfig
    run: RunFolder
    runtime: Runtime
    data: DataBundle
    net: nn.Module
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler
    ema: EMA | None = None
    mix: BatchMix | None = None

    def train_step(self) -> TrainStep:
        """The optimisation step ``train_one_epoch`` runs, with the trainer's clipping and accumulation."""
        t = self.trainer
        return TrainStep(self.model, self.net, self.loss_fn, self.optimizer, self.scaler, self.runtime,
                         t.gradient_clip, t.accumulate_grad_batches, self.mix, self.ema)

    @property
    def model_spec(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg.model, resolve=True)  # type: ignore[return-value]

    @property
    def validated(self) -> nn.Module:
        """The network that is validated and checkpointed as ``model``: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.net


def apply_weight_statistics(cfg: DictConfig) -> None:
    """``dataset.mean/std=auto`` with pretrained starting weights: set them to the weights' own statistics
    (explicit settings win; see :func:`cellcls.data.normalization.follow_weights`)."""
    ds = cfg.dataset
    chosen = follow_weights(ds.mean, ds.std, starting_statistics(OmegaConf.to_container(cfg.model, resolve=True)),
                            int(ds.channels))
    if chosen is not None:
        ds.mean, ds.std = chosen
        log.info("dataset.mean/std=auto: the starting weights' statistics, %s (dataset.mean=data dataset.std=data "
                 "for the training split's)", describe(*chosen))


def record_data_decisions(cfg: DictConfig, data: DataBundle) -> None:
    """Write what the data decided into the config (measured normalisation, the absolute data root), so the run's
    config and checkpoints record what was trained on."""
    prep = data.preprocessing
    cfg.dataset.mean = list(prep.mean) if prep.mean is not None else None
    cfg.dataset.std = list(prep.std) if prep.std is not None else None
    if cfg.dataset.render is None:
        cfg.dataset.root = str(data.root)


def single_label_loss(cfg: DictConfig, data: DataBundle, single_logit: bool) -> ClassificationLoss:
    """Cross-entropy with ``class_weights`` (the training loss only: validation and test use the unweighted one,
    as Keras does) and ``label_smoothing``."""
    classes = data.classes
    weights = None
    if cfg.class_weights == "balanced":
        weights = balanced_class_weights(data.splits["train"].labels, len(classes))
        log.info("class weights (balanced): %s", {c: round(float(w), 3) for c, w in zip(classes, weights)})
        if cfg.dataset.get("sampler") == "balanced":  # the sampler evens the classes out already
            log.warning("class_weights=balanced with dataset.sampler=balanced corrects the class balance twice: the "
                        "rare classes now outweigh the common ones; use one of the two")
    return ClassificationLoss(num_outputs(len(classes), single_logit), weights, float(cfg.get("label_smoothing") or 0.0))


def multilabel_loss(cfg: DictConfig, data: DataBundle) -> MultiLabelLoss:
    """Binary cross-entropy per finding, its positives weighted by the training split's negatives / positives
    (``dataset.table.pos_weight=balanced``, the default) or not (``none``)."""
    for setting, value in (("class_weights", cfg.get("class_weights") not in (None, "none")),
                           ("label_smoothing", bool(cfg.get("label_smoothing"))),
                           ("augment.mixup / augment.cutmix", bool(cfg.get("augment") and (cfg.augment.get("mixup")
                                                                                             or cfg.augment.get("cutmix"))))):
        if value:
            raise ConfigError(f"{setting} is for single-label classes; a multi-label table (dataset.table.label_sep / "
                              "finding_columns) trains one sigmoid per finding: leave it unset (dataset.table.pos_weight "
                              "balances each finding)")
    pos_weight = None
    if str(cfg.dataset.table.get("pos_weight", "balanced")) == "balanced":
        pos_weight = positive_weights(data.splits["train"].training_targets())  # type: ignore[arg-type]
        log.info("finding positive weights (balanced): %s",
                 {c: round(float(w), 3) for c, w in zip(data.classes, pos_weight)})
    return MultiLabelLoss(len(data.classes), pos_weight)


def build_job(cfg: DictConfig, run_dir: Path, starting_weights: bool = True,
              check_stop: Callable[[], None] | None = None) -> Job:
    """Build a job from a validated config. The config is updated in place with what the data decided
    (measured ``auto`` normalisation, the absolute data root), so checkpoints record what was trained on.
    ``starting_weights=False`` (a resumed run) skips ``model.weights``/``model.pretrained``: the checkpoint's follow.
    ``check_stop`` is called while the cache is decoded (it raises to stop there: a signal)."""
    seed_everything(int(cfg.seed))
    t = typed(cfg.trainer, TrainerConfig)
    if starting_weights:
        apply_weight_statistics(cfg)
    runtime = setup_runtime(t)
    # rank 0 fills the decoded cache first; the others then read it
    if not runtime.is_main:
        distributed.barrier()
    shard = (runtime.dist.world_size, runtime.dist.rank) if runtime.dist.enabled else None
    # the data layer takes its sections typed, parsed here once (after the starting weights set mean/std)
    data = build_data(typed(cfg.dataset, DatasetConfig), parse_augment(cfg.augment), int(cfg.seed), runtime.device,
                      t.pipeline,
                      eval_batch_size(t.eval_batch_size, int(cfg.dataset.batch_size), runtime.device), shard,
                      fold_of(cfg), check_stop)
    if runtime.is_main and runtime.dist.enabled:
        distributed.barrier()
    record_data_decisions(cfg, data)

    prep, classes = data.preprocessing, data.classes
    if data.multilabel and cfg.model.get("single_logit"):  # a seed recipe's binary head: one logit per finding instead
        log.info("model.single_logit=true is for two classes; a multi-label model has one sigmoid per finding")
        cfg.model.single_logit = False
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    net = build_model(spec, prep.channels, len(classes), prep.image_size, starting_weights).to(runtime.device)
    net = net.to(memory_format=runtime.memory_format)
    if starting_weights:  # a resumed run keeps the record of what its first attempt started from
        record = getattr(net, "starting_weights", None)
        with open_dict(cfg.model):
            cfg.model.starting_weights = record.to_dict() if record is not None else None
        if record is not None:
            log.info("starting weights: %s from %s", record.describe(), record.file)
    model: nn.Module = net
    if runtime.dist.enabled:
        model = DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)  # the training step only: evaluation and checkpoints use `net`

    if data.multilabel:
        loss_fn: nn.Module = multilabel_loss(cfg, data).to(runtime.device)
    else:
        loss_fn = single_label_loss(cfg, data, bool(spec.get("single_logit"))).to(runtime.device)
    optimizer = build_optimizer(net, OmegaConf.to_container(cfg.optim, resolve=True))
    mode = metric_mode(t.monitor, t.monitor_mode)
    scheduler = build_scheduler(optimizer, OmegaConf.to_container(cfg.scheduler, resolve=True), t.max_epochs, mode)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype is torch.float16)
    ema = EMA(net, t.ema_decay) if t.ema_decay else None
    mix = build_mix(OmegaConf.to_container(cfg.augment, resolve=True) if cfg.get("augment") else None, len(classes))
    return Job(cfg, t, RunFolder(run_dir), runtime, data, net, model, loss_fn, optimizer, scheduler, scaler, ema,
               mix)
