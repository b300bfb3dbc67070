"""The training loop: fit with validation, LR-on-plateau and early stopping, checkpoints, and a final test."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from cellcls import distributed, plots
from cellcls.callbacks import EarlyStopping, metric_mode
from cellcls.checkpoint import save_checkpoint
from cellcls.cli import as_bool
from cellcls.data.datamodule import DataBundle, build_data
from cellcls.data.device_loader import DeviceBatches
from cellcls.data.splits import write_split_lists
from cellcls.data.summary import count_table
from cellcls.errors import ConfigError
from cellcls.hardware import (
    cpu_bf16_works,
    eval_batch_size,
    resolve_device,
    set_cpu_threads,
)
from cellcls.inference import mean_loss, run_inference
from cellcls.loggers import RunLogger
from cellcls.losses import ClassificationLoss, balanced_class_weights, probabilities
from cellcls.metrics import roc_auc
from cellcls.model_summary import summary_table
from cellcls.models import build_model, count_parameters, l2_penalty, num_outputs
from cellcls.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision`` (None: full float32)."""
    precision = str(precision)
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "16" and device.type != "cuda":
        raise ConfigError("trainer.precision=16 needs a CUDA device; use 32 or bf16 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_works():
        raise ConfigError(
            "trainer.precision=bf16: bf16 crashes on this CPU (it advertises bf16/AMX instructions that do not run "
            "here); use trainer.precision=32, or start with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 to keep bf16 off AMX"
        )
    return {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]


def memory_format(setting: Any) -> torch.memory_format:
    """``trainer.channels_last``: auto/true use NHWC, which oneDNN and cuDNN convolutions run faster
    (LeNet training on 2 CPU cores: 321 -> 612 img/s); false keeps NCHW."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"trainer.channels_last={setting!r} is not valid; allowed values: auto, true, false")
    return torch.contiguous_format if value == "false" else torch.channels_last


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's RNG seed is a function of (seed, epoch), so a resumed run repeats the same randomness."""
    return (seed * 1_000_003 + epoch) % 2**63


@dataclass
class Scores:
    loss: float
    accuracy: float
    balanced_accuracy: float
    roc_auc: float


class Trainer:
    """Runs one training job into ``run_dir`` from a composed, validated config."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        t = cfg.trainer
        self.seed = int(cfg.seed)
        seed_everything(self.seed)
        self.device = resolve_device(str(t.device))
        self.dist = distributed.setup(str(t.get("strategy", "auto")), self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if not self.is_main:
            logging.getLogger("cellcls").setLevel(logging.WARNING)
        if self.device.type == "cpu":
            set_cpu_threads(t.get("num_threads", "auto"), int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.dist.enabled else 1)
        self.amp_dtype = autocast_dtype(str(t.precision), self.device)
        if t.get("deterministic"):
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # rank 0 fills the decoded cache first; the others then read it
        if not self.is_main:
            distributed.barrier()
        self.data: DataBundle = build_data(
            cfg.dataset, cfg.get("augment"), self.seed, self.device, str(t.get("pipeline", "auto")),
            eval_batch_size(t.get("eval_batch_size", "auto"), int(cfg.dataset.batch_size), self.device))
        if self.is_main and self.dist.enabled:
            distributed.barrier()
        # `auto` normalisation is now numbers, and a real data set's root an absolute path: the run's config,
        # checkpoints and config.yaml keep those, so every later reader sees what this run trained on
        cfg.dataset.mean, cfg.dataset.std = self.data.preprocessing["mean"], self.data.preprocessing["std"]
        if cfg.dataset.get("render") is None:
            cfg.dataset.root = str(self.data.root)
        if self.dist.enabled:
            self._shard_training_data()
        classes = self.data.classes
        prep = self.data.preprocessing
        self.model_spec = OmegaConf.to_container(cfg.model, resolve=True)
        self.net = build_model(self.model_spec, prep["channels"], len(classes), prep["image_size"]).to(self.device)
        self.memory_format = memory_format(t.get("channels_last", "auto"))
        self.net = self.net.to(memory_format=self.memory_format)
        # self.model is what the training step calls (DDP-wrapped under torchrun); self.net the plain network
        self.model: nn.Module = self.net
        if self.dist.enabled:
            self.model = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if as_bool("trainer.compile", str(t.get("compile", False))):
            # the training step only: evaluation and checkpoints use the plain network (self.net)
            self.model = torch.compile(self.model)
        self.outputs = num_outputs(len(classes), bool(self.model_spec.get("single_logit", False)))

        weights = None
        if cfg.class_weights == "balanced":
            weights = balanced_class_weights(self.data.splits["train"].labels, len(classes))
            log.info("class weights (balanced): %s", {c: round(float(w), 3) for c, w in zip(classes, weights)})
        # Keras weights only the training loss; validation and test use the unweighted mean_loss
        self.train_loss = ClassificationLoss(self.outputs, weights).to(self.device)

        self.optimizer = build_optimizer(self.net.parameters(), OmegaConf.to_container(cfg.optim, resolve=True))
        self.mode = metric_mode(str(t.monitor), str(t.monitor_mode))
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, int(t.max_epochs), self.mode)
        es = t.early_stopping
        self.early = EarlyStopping(str(t.monitor), self.mode, es.patience, es.min_delta, bool(es.enabled))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.ckpt_dir = run_dir / "checkpoints"
        self.start_epoch = 0
        history: list[dict[str, Any]] = []
        if resume is not None:
            history = self._restore(resume)
        self.logger = RunLogger(run_dir, tensorboard=bool(cfg.logger.tensorboard), history=history, enabled=self.is_main)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (always, unless it is a non-zero torchrun rank)."""
        return self.dist.is_main

    def _shard_training_data(self) -> None:
        """Each process trains on its share of every epoch (DistributedSampler, reshuffled per epoch)."""
        old = self.data.loaders["train"]
        self.sampler = DistributedSampler(old.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=bool(self.cfg.dataset.get("shuffle", True)), seed=self.seed)
        if isinstance(old, DeviceBatches):
            old.use_sampler(self.sampler)
            return
        self.data.loaders["train"] = DataLoader(
            old.dataset, batch_size=old.batch_size, sampler=self.sampler, num_workers=old.num_workers,
            pin_memory=old.pin_memory, persistent_workers=old.persistent_workers, collate_fn=old.collate_fn)

    # ---- state -------------------------------------------------------------------------------------------
    def _restore(self, ckpt: dict[str, Any]) -> list[dict[str, Any]]:
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.early.load_state_dict(ckpt["early_stopping"])
        self.start_epoch = int(ckpt["epoch"])
        src_best = Path(ckpt["path"]).with_name("best.pt")
        if self.is_main and src_best.is_file() and src_best.resolve() != (self.ckpt_dir / "best.pt").resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_best, self.ckpt_dir / "best.pt")
        log.info("resumed from %s after epoch %d", ckpt["path"], self.start_epoch)
        return list(ckpt.get("history", []))

    def _payload(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "early_stopping": self.early.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "model_spec": self.model_spec,
            "classes": self.data.classes,
            "preprocessing": self.data.preprocessing,
            "history": self.logger.rows,
            "monitor": {"metric": self.early.monitor, "mode": self.mode, "best": self.early.best, "best_epoch": self.early.best_epoch},
        }

    # ---- loops -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        loader = self.data.loaders["train"]
        # running sums stay on the device: reading them every step would stall the GPU's queue of work
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        show = bool(self.cfg.trainer.progress_bar and self.is_main)
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.trainer.max_epochs}", leave=False,
                   disable=not show, mininterval=0.5, dynamic_ncols=True)
        for step, (images, targets) in enumerate(bar):
            if targets.numel() == 0:  # every image of the batch failed to decode (uncached mode)
                continue
            if epoch == 1 and step == 0 and self.is_main:
                self._log_augmented(images)
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(images)
                loss = self.train_loss(logits, targets) + l2_penalty(self.net)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.trainer.get("gradient_clip"):
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), float(self.cfg.trainer.gradient_clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = targets.shape[0]
            total_loss += loss.detach().double() * n
            correct += (self._predict_labels(logits.detach()) == targets).sum()
            seen += n
            if show and step % 20 == 0:
                bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}", acc=f"{int(correct) / seen:.4f}", refresh=False)
        bar.close()
        total, right, count = distributed.all_reduce_sum([float(total_loss), float(correct), float(seen)])
        return total / count, right / count

    def _predict_labels(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return (logits[:, 0] > 0).long()
        return logits.argmax(dim=1)

    def evaluate(self, split: str) -> Scores:
        """Loss (unweighted, with the model's L2 terms as Keras reports it), accuracy, balanced accuracy, ROC-AUC."""
        logits, targets = run_inference(self.net, self.data.loaders[split], self.device, self.amp_dtype, self.memory_format)
        y_pred, y_true = self._predict_labels(logits).numpy(), targets.numpy()
        loss = mean_loss(self.net, logits, targets)
        return Scores(loss, float((y_pred == y_true).mean()), float(balanced_accuracy_score(y_true, y_pred)),
                      roc_auc(y_true, probabilities(logits).numpy()))

    def _log_augmented(self, images: torch.Tensor) -> None:
        prep = self.data.preprocessing
        shown = images[:32].detach().float().cpu()
        if prep["mean"] is not None:
            mean = torch.tensor(prep["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(prep["std"]).view(1, -1, 1, 1)
            shown = shown * std + mean
        self.logger.log_images("train/augmented_samples", shown, 0)
        picked = (shown[:9].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        name = self.cfg.augment.get("name", "none") if self.cfg.get("augment") else "none"
        plots.save(plots.image_grid(list(picked), [f"augment={name}"] * len(picked)), self.run_dir / "augmented_samples.png")

    # ---- the job -----------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_epochs`` or early stop; test the best checkpoint; return a summary."""
        cfg, t = self.cfg, self.cfg.trainer
        classes = self.data.classes
        try:
            return self._fit(cfg, t, classes)
        finally:
            distributed.teardown()

    def _fit(self, cfg: DictConfig, t: DictConfig, classes: list[str]) -> dict[str, Any]:
        if self.is_main:
            write_split_lists(self.run_dir, self.data.splits, self.data.root, classes)
            # the resolved config beside the splits: what `scripts/reference.py` and a reader of the folder need
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if self.data.ignored:
            log.warning("ignored %d non-image file(s), e.g. %s", len(self.data.ignored), self.data.ignored[0])
        if self.data.skipped and self.is_main:
            (self.run_dir / "skipped_files.txt").write_text("".join(f"{p}\t{why}\n" for p, why in self.data.skipped))
            log.warning("skipped %d unreadable image(s); listed in skipped_files.txt", len(self.data.skipped))
        log.info("data %s at %s\n%s", cfg.dataset.name, self.data.root, count_table(self.data.splits, classes))
        log.info("model %s: %s parameters, device %s, precision %s%s", self.model_spec["name"],
                 f"{count_parameters(self.net):,}", self.device, self.amp_dtype or "float32",
                 f", {self.dist.world_size} processes (DDP)" if self.dist.enabled else "")
        prep = self.data.preprocessing
        table = summary_table(self.net, (prep["channels"], *prep["image_size"]))
        if self.is_main:
            (self.run_dir / "model_summary.txt").write_text(table + "\n")
        log.info("model summary\n%s", table)
        if self.resume is None:
            self.logger.log_text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
            self.logger.log_text("model_summary", "```\n" + table + "\n```")

        max_epochs = int(t.max_epochs)
        stopped_early = False
        for epoch in range(self.start_epoch + 1, max_epochs + 1):
            started = time.perf_counter()
            seed = epoch_seed(self.seed, epoch)
            torch.manual_seed(seed + self.dist.rank)  # each process augments its share differently
            self.data.train_generator.manual_seed(seed)
            if self.dist.enabled:
                self.sampler.set_epoch(epoch)
            train_loss, train_acc = self._train_epoch(epoch)
            val = self.evaluate("val")
            metrics = {
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val.loss,
                "val_accuracy": val.accuracy,
                "val_balanced_accuracy": val.balanced_accuracy,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            monitored = metrics[str(t.monitor)]
            improved, stop = self.early.step(monitored, epoch)
            stop = distributed.broadcast_flag(stop)
            if isinstance(self.scheduler, ReduceLROnPlateau):
                self.scheduler.step(monitored)
            elif self.scheduler is not None:
                self.scheduler.step()
            metrics["epoch_time_s"] = time.perf_counter() - started
            self.logger.log_epoch(epoch, metrics)
            if self.is_main:
                payload = self._payload(epoch)
                save_checkpoint(payload, self.ckpt_dir / "last.pt")
                if improved:
                    save_checkpoint(payload, self.ckpt_dir / "best.pt")
            log.info(
                "epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  lr %.2g%s  (%.1fs)",
                epoch, max_epochs, train_loss, train_acc, val.loss, val.accuracy, metrics["lr"],
                "  *" if improved else "", metrics["epoch_time_s"],
            )
            if stop:
                stopped_early = True
                log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                         t.monitor, self.early.wait, self.early.best, self.early.best_epoch)
                break
        return self._finish(stopped_early)

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "monitor": str(self.cfg.trainer.monitor),
            "best": self.early.best,
            "best_epoch": self.early.best_epoch,
            "epochs_run": len(self.logger.rows),
            "stopped_early": stopped_early,
        }
        if not self.is_main:
            return summary
        best_path = self.ckpt_dir / "best.pt"
        if "test" in self.data.loaders and best_path.is_file():
            best = torch.load(best_path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(best["model"])
            # the default layout, as `cellcls.evaluate` runs it, so its numbers reproduce these exactly
            self.net.to(memory_format=torch.contiguous_format)
            self.memory_format = torch.contiguous_format
            test = self.evaluate("test")
            result = {
                "checkpoint": "checkpoints/best.pt",
                "epoch": int(best["epoch"]),
                "split": "test",
                "num_images": len(self.data.splits["test"]),
                "loss": test.loss,
                "accuracy": test.accuracy,
                "balanced_accuracy": test.balanced_accuracy,
                "roc_auc": test.roc_auc if math.isfinite(test.roc_auc) else None,  # undefined with one class
            }
            tmp = self.run_dir / "test_metrics.json.tmp"
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(self.run_dir / "test_metrics.json")
            log.info("test (best epoch %d): loss %.4f  acc %.4f  balanced acc %.4f  ROC-AUC %.4f",
                     result["epoch"], test.loss, test.accuracy, test.balanced_accuracy, test.roc_auc)
            summary["test"] = result
        hparams = {
            "dataset": str(self.cfg.dataset.name),
            "model": str(self.model_spec["name"]),
            "optim": str(self.cfg.optim.name),
            "lr": float(self.cfg.optim.lr),
            "weight_decay": float(self.cfg.optim.get("weight_decay", 0.0) or 0.0),
            "batch_size": int(self.cfg.dataset.batch_size),
            "augment": str(self.cfg.augment.get("name", "")),
            "class_weights": str(self.cfg.class_weights),
            "seed": self.seed,
        }
        final = {f"hparam/best_{summary['monitor']}": float(self.early.best)}
        if "test" in summary:
            final["hparam/test_accuracy"] = summary["test"]["accuracy"]
        if all(math.isfinite(v) for v in final.values()):
            self.logger.log_hparams(hparams, final)
        curves = plots.save(plots.training_curves(self.logger.rows), self.run_dir / "training_curves.png")
        self.logger.log_image_hwc("train/training_curves", plots.png_to_array(curves))
        self.logger.close()
        return summary
