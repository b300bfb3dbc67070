"""A trained model rebuilt from its checkpoint alone, ready to classify uint8 images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cellcls.infra.checkpoint import Checkpoint, load_checkpoint
from cellcls.data.preprocessing import Preprocessing, preprocess
from cellcls.metric_names import EPOCH_METRICS, TEST_METRICS, split_metric
from cellcls.models import build_model, model_label
from cellcls.scoring.heads import Decision
from cellcls.data.findings import is_multilabel
from cellcls.scoring.multilabel import FindingRule, finding_probabilities
from cellcls.scoring.ood import OODRule, activation_statistics
from cellcls.models.tta import check_tta, with_tta
from cellcls.infra.run_folder import BEST, RunFolder
from cellcls.infra.runtime import resolve_device


@dataclass
class LoadedModel:
    """A model in eval mode with everything needed to feed it: classes, preprocessing, the training config."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    config: DictConfig
    path: Path
    epoch: int
    device: torch.device
    metrics: dict[str, Any] = field(default_factory=dict)
    decision: Decision = field(default_factory=Decision)  # temperature and threshold fitted on validation
    tta: str = "none"  # test-time flips averaged by `predict` and `scorer` (cellcls.models.tta)
    ood: OODRule | None = None  # flags images unlike the training split's (cellcls.scoring.ood)
    # a multi-label model (one sigmoid per finding): each finding's threshold; None for single-label classes
    findings: FindingRule | None = None
    supports_cam = True

    @property
    def multilabel(self) -> bool:
        return self.findings is not None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities under the decision rule, or each finding's sigmoid for a multi-label model."""
        return finding_probabilities(logits) if self.findings is not None else self.decision.probabilities(logits)

    @property
    def scorer(self) -> nn.Module:
        """The network that scores images: ``model``, or its flip average under ``tta``."""
        return with_tta(self.model, self.tta)

    @property
    def threshold(self) -> float | None:
        return self.decision.threshold

    @property
    def run(self) -> RunFolder:
        return RunFolder.of_checkpoint(self.path)

    @property
    def run_dir(self) -> Path:
        return self.run.root

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``N x C x H x W`` (already resized) -> the float input the model was trained on."""
        return preprocess(images, self.preprocessing, self.device)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``N x num_classes`` for uint8 images (``N x C x H x W`` at the model's size)."""
        return self.probabilities(self.scorer(self.prepare(images))).cpu().numpy()

    @torch.inference_mode()
    def assess(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and, with an out-of-distribution rule, which images lie outside what the model was
        trained on (None without one); one forward pass unless flips are averaged."""
        if self.ood is None:
            return self.predict(images), None
        features, logits = activation_statistics(self.model, self.prepare(images))
        probs = self.predict(images) if self.tta != "none" else self.decision.probabilities(logits).numpy()
        return probs, self.ood.flags(features)

    @property
    def card(self) -> dict[str, Any]:
        """What a person or a client needs to know of the model: name, classes, input, metrics (JSON-ready)."""
        return {
            "model": model_label(self.config.model),
            "dataset": str(self.config.dataset.name) if "dataset" in self.config else None,  # None: built by hand
            "classes": list(self.classes),
            "input": self.preprocessing.input_spec(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "epoch": self.epoch,
            "checkpoint": str(self.path),
            "metrics": self.metrics,
            "task": "multilabel" if self.findings is not None else "multiclass",
            "decision": self.findings.to_dict() if self.findings is not None else self.decision.to_dict(),
            "tta": self.tta,
            "ood": {"level": self.ood.level, "fitted_on": self.ood.fitted_on} if self.ood is not None else None,
            # what training started from (None: random initialisation); see cellcls.models.pretrained
            "starting_weights": {k: self.config.model.starting_weights.get(k) for k in ("source", "name", "sha256")}
            if self.config.model.get("starting_weights") else None,
        }


def load_model(location: str | Path, device: str = "auto", tta: str | None = None) -> LoadedModel:
    """The model of a checkpoint file, or of a run folder's ``checkpoints/best.pt``; ``tta`` averages its logits
    over flipped copies of each image (:mod:`cellcls.models.tta`; None: the model's own ``model.tta``, which a probe
    fitted on flip-averaged features sets, else none)."""
    ckpt = load_checkpoint(location, name=BEST)
    dev = resolve_device(device, setting="device")
    prep = Preprocessing.from_dict(ckpt.preprocessing, source=str(ckpt.path))
    model = model_of(ckpt)
    model.to(dev).eval()
    assert ckpt.path is not None
    return LoadedModel(model, list(ckpt.classes), prep, OmegaConf.create(ckpt.config), ckpt.path, ckpt.epoch, dev,
                       checkpoint_metrics(ckpt), Decision.of(ckpt.calibration),
                       check_tta(tta if tta is not None else str(ckpt.model_spec.get("tta") or "none")),
                       OODRule.of(ckpt.ood, str(ckpt.path)),
                       FindingRule.of(ckpt.calibration, len(ckpt.classes)) if is_multilabel(ckpt.config.get("dataset") or {})
                       else None)


def model_of(ckpt: Checkpoint) -> nn.Module:
    """The network a checkpoint describes, with its weights; a spec and weights that do not fit together (an edited
    file, or two runs' parts mixed) are refused naming what differs."""
    prep = Preprocessing.from_dict(ckpt.preprocessing, source=str(ckpt.path))
    what = (f"{ckpt.model_spec.get('name')}, {len(ckpt.classes)} classes, {prep.channels} channel(s), "
            f"{'x'.join(str(s) for s in prep.image_size)} px")
    try:
        model = build_model(ckpt.model_spec, prep.channels, len(ckpt.classes), prep.image_size,
                            starting_weights=False)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{ckpt.path}: its model_spec does not describe a model cellcls can build ({what}: {exc}); "
                         "the file was edited or written by other code") from None
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        lines = [ln.strip().rstrip(".") for ln in str(exc).splitlines()[1:] if ln.strip()]
        raise ValueError(f"{ckpt.path}: its weights do not fit the model its spec and classes describe ({what}): "
                         f"{lines[0] if lines else exc}{f' (and {len(lines) - 1} more)' if len(lines) > 1 else ''}; "
                         "the file was edited, or its parts come from two runs") from None
    return model


def checkpoint_metrics(ckpt: Checkpoint) -> dict[str, Any]:
    """Validation metrics of the checkpoint's epoch, and the run's test metrics when they belong to it."""
    row = next((r for r in ckpt.history if int(r["epoch"]) == ckpt.epoch), {})
    out: dict[str, Any] = {"monitor": ckpt.monitor.get("metric")}
    val = {split_metric(k)[1]: float(v) for k, v in row.items() if k in EPOCH_METRICS and k.startswith("val_")}
    if val:
        out["val"] = val
    test_file = ckpt.run.test_metrics
    if test_file.is_file():
        test = json.loads(test_file.read_text())
        if int(test.get("epoch", -1)) == ckpt.epoch:
            out["test"] = {k: test[k] for k in (*TEST_METRICS, "num_images") if k in test}
            if "accuracy" in (test.get("ci95") or {}):  # the interval evaluate reports, over patients where known
                out["test"]["accuracy_ci95"] = test["ci95"]["accuracy"]
                out["test"]["interval"] = test["interval"]["method"]
    return out
