"""The hand-written equivalent of a cellcls run, trained on the same split files: the bar cellcls must meet.

    python scripts/reference.py run=<cellcls run folder> [seed=0] [epochs=<n>] [device=cpu|cuda|auto] [root=<dir>]

It imports nothing from cellcls. From the run folder it reads only ``splits/{train,val,test}.csv`` (file relative to
the data root, class) and the resolved config ``config.yaml`` (data root, image size, channels, batch size,
augmentation, model, optimiser, scheduler, early stopping, class weights). It then does what a careful person would
write in a notebook: PIL decode + torchvision v2 transforms per image (RandomAffine/flips as the augment config
says), the tutorial's layers as an ``nn.Sequential`` with PyTorch's default initialisation, a plain loop, and the
model of the last epoch (or of the early-stopping epoch, restored to the best val_loss as Keras'
``restore_best_weights``) scored on the test split. It prints the reference's test metrics beside the run's own
``test_metrics.json``. ``init=keras`` (Glorot-uniform, zero bias) and ``select=best`` (the best-val_loss epoch) are
there for diagnosis. ``--json`` prints one JSON line instead of the table.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

OPTIONS = {"run": None, "seed": "0", "epochs": None, "device": "auto", "root": None, "init": "torch",
           "select": "auto", "threads": None}


class Files(Dataset):
    """Images of one split, decoded and resized once (uint8, C x H x W), transformed per access."""

    def __init__(self, rows: list[tuple[Path, int]], channels: int, size: tuple[int, int], transform: v2.Compose):
        self.labels = [label for _, label in rows]
        resize = v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        mode = "RGB" if channels == 3 else "L"
        self.images = [resize(v2.functional.pil_to_tensor(Image.open(p).convert(mode))) for p, _ in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i]


def config_file(run: Path) -> Path:
    """The run's resolved config: ``config.yaml`` (every cellcls run) or Hydra's ``.hydra/config.yaml``."""
    return run / "config.yaml" if (run / "config.yaml").is_file() else run / ".hydra" / "config.yaml"


def read_split(run: Path, split: str, root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    with open(run / "splits" / f"{split}.csv", newline="") as fh:
        return [(root / r["file"], classes.index(r["class"])) for r in csv.DictReader(fh)]


def transforms(aug: dict[str, Any] | None, mean: list[float] | None, std: list[float] | None) -> v2.Compose:
    steps: list[Any] = []
    if aug:
        shift, zoom = float(aug.get("shift") or 0), float(aug.get("zoom") or 0)
        rotation, shear = float(aug.get("rotation") or 0), math.degrees(float(aug.get("shear") or 0))
        if rotation or shift or zoom or shear:
            steps.append(v2.RandomAffine(rotation, translate=(shift, shift) if shift else None,
                                         scale=(1 - zoom, 1 + zoom) if zoom else None, shear=shear or None,
                                         fill=aug.get("fill", 0)))
        if aug.get("hflip"):
            steps.append(v2.RandomHorizontalFlip())
        if aug.get("vflip"):
            steps.append(v2.RandomVerticalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None:
        steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


def conv_blocks(c: int, filters: list[int], pads: list[str]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for f, pad in zip(filters, pads):
        layers += [nn.Conv2d(c, f, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2)]
        c = f
    return layers


def model_for(spec: dict[str, Any], c: int, outputs: int) -> nn.Sequential:
    """The tutorials' layer lists, written out (LazyLinear infers the flatten size)."""
    name = spec["name"]
    if name == "lenet":
        return nn.Sequential(*conv_blocks(c, [8, 16, 32], ["same", "same", "valid"]), nn.Flatten(),
                             nn.LazyLinear(64), nn.ReLU(), nn.Dropout(spec.get("dropout", 0.5)), nn.Linear(64, outputs))
    if name == "blood_cnn":
        return nn.Sequential(nn.Conv2d(c, 80, 3), nn.ReLU(), nn.Conv2d(80, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Dropout(spec.get("conv_dropout", 0.25)), nn.Flatten(),
                             nn.LazyLinear(128), nn.ReLU(), nn.Dropout(spec.get("dropout", 0.5)), nn.Linear(128, outputs))
    if name == "skin_cnn":
        return nn.Sequential(*conv_blocks(c, [16, 32, 64, 128], ["valid"] * 4), nn.Flatten(),
                             nn.Dropout(spec.get("dropout", 0.5)), nn.LazyLinear(512), nn.ReLU(), nn.Linear(512, outputs))
    if name == "xray_cnn":
        return nn.Sequential(*conv_blocks(c, [32, 32, 32, 64, 64], ["valid"] * 5), nn.Flatten(),
                             nn.LazyLinear(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, outputs))
    raise SystemExit(f"reference: no hand-written equivalent of model {name!r}")


def l2_terms(model: nn.Sequential, spec: dict[str, Any]) -> torch.Tensor | float:
    """Keras ``kernel_regularizer=l2(c)`` on the skin CNN's Dense-512 kernel."""
    if spec["name"] != "skin_cnn" or not spec.get("dense_l2", 0.001):
        return 0.0
    dense = [m for m in model if isinstance(m, nn.Linear)][0]
    return float(spec.get("dense_l2", 0.001)) * dense.weight.pow(2).sum()


def scores(model: nn.Module, loader: DataLoader, device: torch.device, single: bool) -> dict[str, float]:
    model.eval()
    probs, ys = [], []
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device)).float().cpu()
            p = torch.sigmoid(out[:, 0]) if single else torch.softmax(out, 1)
            probs.append(torch.stack([1 - p, p], 1) if single else p)
            ys.append(y)
    prob, y = torch.cat(probs).numpy(), torch.cat(ys).numpy()
    pred = prob.argmax(1)
    eps = 1e-7
    loss = float(-np.log(np.clip(prob[np.arange(len(y)), y], eps, 1)).mean())
    auc = roc_auc_score(y, prob[:, 1]) if prob.shape[1] == 2 else roc_auc_score(y, prob, multi_class="ovr")
    return {"loss": loss, "accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
            "roc_auc": float(auc)}


def modern_settings(cfg: dict) -> list[str]:
    """The settings of a run (issue 15's fine-tuning controls) that this loop does not reproduce."""
    t, optim, aug = cfg.get("trainer", {}), cfg.get("optim", {}), cfg.get("augment", {})
    found = {
        "optim.backbone_lr_scale": optim.get("backbone_lr_scale", 1.0) != 1.0,
        "optim.decay_norm_and_bias=false": optim.get("decay_norm_and_bias", True) is False,
        "scheduler.warmup_epochs": bool((cfg.get("scheduler") or {}).get("warmup_epochs")),
        "trainer.accumulate_grad_batches": t.get("accumulate_grad_batches", 1) != 1,
        "trainer.ema_decay": t.get("ema_decay") is not None,
        "label_smoothing": bool(cfg.get("label_smoothing")),
        "augment.mixup/cutmix": bool(aug.get("mixup") or aug.get("cutmix")),
        "augment.policy": aug.get("policy", "none") != "none",
        "model=timm": (cfg.get("model") or {}).get("name") == "timm",
        "callbacks.freeze_backbone": bool(((cfg.get("callbacks") or {}).get("freeze_backbone") or {}).get("epochs")),
    }
    return [name for name, used in found.items() if used]


def train_reference(run: Path, seed: int = 0, epochs: int | None = None, device: str = "auto", root: str | None = None,
                    init: str = "torch", select: str = "auto") -> dict[str, Any]:
    """Train the hand-written equivalent of ``run`` and return its test (and validation) metrics."""
    cfg = yaml.safe_load(config_file(run).read_text())
    ds, t = cfg["dataset"], cfg["trainer"]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    data_root = Path(root or ds["root"]).expanduser()
    with open(run / "splits" / "train.csv", newline="") as fh:
        classes = list(dict.fromkeys(r["class"] for r in csv.DictReader(fh)))
    classes = list(ds["classes"]) if ds.get("classes") else sorted(classes)
    size, channels = (int(ds["image_size"][0]), int(ds["image_size"][1])), int(ds["channels"])
    mean, std = ds.get("mean"), ds.get("std")
    aug = cfg.get("augment") if cfg.get("augment", {}).get("name", "none") != "none" else None
    torch.manual_seed(seed)
    sets = {s: Files(read_split(run, s, data_root, classes), channels, size, transforms(aug if s == "train" else None, mean, std))
            for s in ("train", "val", "test") if (run / "splits" / f"{s}.csv").is_file()}
    bs = int(ds["batch_size"])
    train = DataLoader(sets["train"], batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    evals = {s: DataLoader(d, batch_size=128) for s, d in sets.items() if s != "train"}

    spec = cfg["model"]
    single = bool(spec.get("single_logit"))
    model = model_for(spec, channels, 1 if single else len(classes))
    model(torch.zeros(1, channels, *size))  # materialise the lazy layer
    if init == "keras":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    model.to(dev)
    opt_cfg = dict(cfg["optim"])
    unsupported = modern_settings(cfg)
    if unsupported:
        raise SystemExit(f"reference: the hand-written loop reproduces the seed recipes' settings only; this run also "
                         f"uses {', '.join(unsupported)}")
    for key in ("backbone_lr_scale", "decay_norm_and_bias"):  # cellcls' parameter grouping, at its defaults here
        opt_cfg.pop(key, None)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad,
               "adadelta": torch.optim.Adadelta, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[opt_cfg.pop("name")]
    opt_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in opt_cfg.items() if v is not None}
    opt = opt_cls(model.parameters(), **opt_cfg)
    sched_cfg = cfg.get("scheduler") or {"name": "none"}
    sched = None
    if sched_cfg["name"] == "plateau":  # Keras' ReduceLROnPlateau semantics on val_loss
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=sched_cfg.get("factor", 0.1), patience=max(int(sched_cfg.get("patience", 10)) - 1, 0),
            threshold=sched_cfg.get("threshold", 1e-4), threshold_mode="abs", min_lr=sched_cfg.get("min_lr", 0.0))
    elif sched_cfg["name"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(epochs or t["max_epochs"]),
                                                           eta_min=sched_cfg.get("min_lr", 0.0))
    weights = None
    if cfg.get("class_weights") == "balanced":
        counts = np.bincount(sets["train"].labels, minlength=len(classes))
        weights = torch.tensor(len(sets["train"]) / (len(classes) * counts), dtype=torch.float32, device=dev)
    # cellcls >= 0.2: callbacks.early_stopping (null when off); 0.1: trainer.early_stopping with `enabled`
    es = (cfg.get("callbacks") or {}).get("early_stopping") if "callbacks" in cfg else t.get("early_stopping", {})
    patience = int(es["patience"]) if es and es.get("enabled", True) else None
    max_epochs = int(epochs or t["max_epochs"])
    best, best_state, wait, history = math.inf, None, 0, []
    started = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in train:
            x, y = x.to(dev), y.to(dev)
            out = model(x)
            if single:
                per = nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float(), reduction="none")
            else:
                per = nn.functional.cross_entropy(out, y, reduction="none")
            loss = (per * weights[y] if weights is not None else per).mean() + l2_terms(model, spec)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = scores(model, evals["val"], dev, single)
        history.append(val["loss"])
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(val["loss"])
        elif sched is not None:
            sched.step()
        if val["loss"] < best:
            best, best_state, wait = val["loss"], copy.deepcopy(model.state_dict()), 0
        else:
            wait += 1
            if patience is not None and wait >= patience:
                break
    seconds = time.perf_counter() - started
    restore = select == "best" or (select == "auto" and patience is not None)
    if restore and best_state is not None:
        model.load_state_dict(best_state)
    test = scores(model, evals["test"], dev, single)
    return {"seed": seed, "epochs_run": len(history), "train_seconds": seconds, "test": test,
            "images_per_second": len(sets["train"]) * len(history) / seconds}


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    opts = dict(OPTIONS)
    for arg in (a for a in argv if a != "--json"):
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise SystemExit(f"reference: expected one of {', '.join(k + '=' for k in OPTIONS)}; got {arg!r}")
        opts[key] = value
    if not opts["run"]:
        raise SystemExit("reference: run=<cellcls run folder> is required")
    if opts["threads"]:
        torch.set_num_threads(int(opts["threads"]))
    run = Path(opts["run"]).expanduser()
    for needed in (config_file(run), run / "splits" / "train.csv"):
        if not needed.is_file():
            raise SystemExit(f"reference: {needed} not found: run= must be a cellcls run folder")
    result = train_reference(run, int(opts["seed"]), int(opts["epochs"]) if opts["epochs"] else None,
                             opts["device"], opts["root"], opts["init"], opts["select"])
    own_file = run / "test_metrics.json"
    own = json.loads(own_file.read_text()) if own_file.is_file() else {}
    if as_json:
        print(json.dumps({"reference": result, "cellcls": own}))
        return
    print(f"{'test metric':<20}{'cellcls':>10}{'reference':>11}")
    for key in ("accuracy", "balanced_accuracy", "roc_auc", "loss"):
        mine = own.get(key)
        print(f"{key:<20}{(f'{mine:.4f}' if mine is not None else '-'):>10}{result['test'][key]:>11.4f}")
    print(f"reference: {result['epochs_run']} epochs, {result['images_per_second']:.0f} img/s, seed {result['seed']}")


if __name__ == "__main__":
    main(sys.argv[1:])
