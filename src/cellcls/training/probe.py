"""Frozen-feature baselines (``python -m cellcls.probe``): a pretrained backbone's embeddings, computed once, and a
logistic regression and a k-NN fitted on them, with the regularisation and k chosen by grouped cross-validation on
the training split (sklearn).

The logistic regression becomes the backbone's classifier layer (the feature standardisation folded into its weights),
so the result is an ordinary run folder (``checkpoints/best.pt``, ``config.yaml``, ``splits/``, ``test_metrics.json``)
that evaluate, predict, export, Grad-CAM and serve take like any trained model. The k-NN is scored beside it
(``eval/knn_<split>/``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from cellcls.config.schema import DatasetConfig, typed
from cellcls.metric_names import epoch_metrics
from cellcls.infra.checkpoint import Checkpoint, save_checkpoint
from cellcls.data.findings import require_single_label
from cellcls.data.datamodule import DataBundle, build_data, fold_of
from cellcls.data.dataset import skip_none_collate
from cellcls.data.leakage import interval_groups
from cellcls.data.splits import write_split_lists
from cellcls.errors import ConfigError, DataError
from cellcls.scoring.calibration import fit_decision
from cellcls.scoring.inference import score
from cellcls.scoring.metrics import evaluate_predictions
from cellcls.evaluation.report import write_predictions, write_report
from cellcls.models import build_model
from cellcls.models.embeddings import cache_key, cached_embeddings, embed
from cellcls.scoring.heads import Decision, num_outputs
from cellcls.models.tta import check_tta
from cellcls.paths import cache_dir
from cellcls.infra.run_folder import RunFolder, atomic_write, write_json
from cellcls.training.build import apply_weight_statistics, record_data_decisions
from cellcls.infra.runtime import resolve_device, seed_everything

log = logging.getLogger("cellcls.probe")

C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 13))  # inverse L2 strength on standardised features
K_GRID = (1, 3, 5, 7, 11, 15, 21, 31)


@dataclass(frozen=True)
class ProbeSettings:
    """The probe command's own settings: ``flips`` averaged into each embedding, grouped CV ``folds``, ``knn``."""

    flips: str = "none"
    folds: int = 5
    knn: bool = True
    device: str = "auto"
    batch_size: int = 64


@dataclass
class Embedded:
    features: np.ndarray  # N x D
    labels: np.ndarray    # N


def probe(cfg: DictConfig, run_dir: Path, settings: ProbeSettings) -> dict[str, Any]:
    """Embed, fit, write the run folder and score the test split; returns the summary written to ``result.json``."""
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    if spec.get("name") != "timm" or not (spec.get("pretrained") or spec.get("weights")):
        raise ConfigError("a probe needs a pretrained backbone: model=timm model.arch=<name> model.pretrained=true "
                          "(or model.weights=<file>); e.g. model.arch=tf_efficientnet_lite0 with the pretrained extra")
    require_single_label(cfg.dataset, "the linear / k-NN probe")
    check_tta(settings.flips, setting="flips")
    started = time.perf_counter()
    seed_everything(int(cfg.seed))
    device = resolve_device(settings.device, setting="device")
    apply_weight_statistics(cfg)
    ds = typed(cfg.dataset, DatasetConfig)
    data = build_data(ds, None, int(cfg.seed), device, "loader", settings.batch_size, fold=fold_of(cfg))
    prep, classes = data.preprocessing, data.classes
    record_data_decisions(cfg, data)
    net = build_model(spec, prep.channels, len(classes), prep.image_size).to(device)
    record = net.starting_weights
    with open_dict(cfg.model):
        cfg.model.starting_weights = record.to_dict()
        cfg.model.tta = settings.flips
    run = RunFolder(run_dir)
    write_split_lists(run, data.splits, data.root, classes)
    atomic_write(run.config, OmegaConf.to_yaml(cfg, resolve=True))
    log.info("probe of %s (%s) on %s: %s", spec["arch"], record.describe(), cfg.dataset.name,
             ", ".join(f"{n} {len(s)}" for n, s in data.splits.items()))

    t0 = time.perf_counter()
    embedded = {name: _embedded(net, data, name, record.sha256, str(spec["arch"]), settings, device)
                for name in data.splits}
    embed_s = time.perf_counter() - t0
    train = embedded["train"]
    groups = interval_groups(ds, data.splits["train"], data.splits)
    splits = _grouped_folds(train.labels, groups, settings.folds, int(cfg.seed))
    balanced = str(cfg.class_weights) == "balanced"
    t0 = time.perf_counter()
    weight, bias, linear = fit_linear(train, splits, balanced)
    knn = fit_knn(train, splits) if settings.knn else None
    fit_s = time.perf_counter() - t0
    _set_head(net, weight, bias, bool(spec.get("single_logit")), len(classes))

    history, decision = {"epoch": 1}, Decision()
    if "val" in embedded:
        val_logits, val_targets = _logits(net, embedded["val"], device)
        val = score(net, val_logits, val_targets)
        history.update(epoch_metrics("val", loss=val.loss, accuracy=val.accuracy, balanced_accuracy=val.balanced_accuracy))
        if cfg.calibrate or cfg.operating_point or cfg.get("conformal") is not None:
            decision = fit_decision(val_logits, val_targets, bool(cfg.calibrate), cfg.operating_point,
                                    conformal=cfg.get("conformal"))
    ckpt = Checkpoint(epoch=1, model={k: v.cpu() for k, v in net.state_dict().items()},
                      model_spec=OmegaConf.to_container(cfg.model, resolve=True), classes=classes, preprocessing=prep.to_dict(),
                      config=OmegaConf.to_container(cfg, resolve=True), history=[history],
                      monitor={"metric": "val_loss", "mode": "min", "best": history.get("val_loss", math.nan),
                               "best_epoch": 1},
                      calibration=decision.to_dict() if decision.fitted_on else {})
    save_checkpoint(ckpt, run.best_checkpoint)

    summary: dict[str, Any] = {"status": "ok", "kind": "probe", "arch": spec["arch"], "flips": settings.flips,
                               "starting_weights": record.to_dict(), "linear": linear, "val": history,
                               "embed_seconds": round(embed_s, 1), "fit_seconds": round(fit_s, 1)}
    if "test" in embedded:
        summary["test"] = _test(net, embedded["test"], data, decision, run, device, int(cfg.seed))
        if knn is not None:
            summary["knn"] = {**knn["chosen"], "test": _knn_test(knn, embedded["test"], data, run, cfg)}
    elif knn is not None:
        summary["knn"] = knn["chosen"]
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_json(run.result, summary)
    return summary


def _embedded(net: torch.nn.Module, data: DataBundle, split: str, weights_sha: str, arch: str,
              settings: ProbeSettings, device: torch.device) -> Embedded:
    samples = data.splits[split]
    dataset = data.loaders[split].dataset  # no augmentation: build_data was given none
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, collate_fn=skip_none_collate)
    key = cache_key(weights_sha, arch, data.preprocessing, settings.flips, samples.paths)

    def compute() -> np.ndarray:
        feats = embed(net, loader, settings.flips, device)
        if len(feats) != len(samples):
            raise DataError(f"{len(samples) - len(feats)} {split} image(s) could not be decoded; fix or remove them "
                            "(or keep dataset.cache=true, which skips them before the probe starts)")
        return feats

    features, hit = cached_embeddings(cache_dir() / "embeddings", key, compute)
    log.info("%s: %d embeddings of %d values%s", split, *features.shape, " (cached)" if hit else "")
    return Embedded(features, np.asarray(samples.labels))


def _grouped_folds(labels: np.ndarray, groups: list[str] | None, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds of the training split that keep each group (patient, photo) on one side."""
    from sklearn.model_selection import StratifiedGroupKFold

    group_ids = np.asarray(groups) if groups is not None else np.arange(len(labels)).astype(str)
    smallest = min(len(set(group_ids[labels == c])) for c in np.unique(labels))
    k = min(int(folds), smallest)
    if k < 2:
        raise DataError(f"the training split has {smallest} group(s) of its rarest class: too few to cross-validate")
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(labels, labels, group_ids))


def fit_linear(train: Embedded, splits: list, balanced: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A multinomial logistic regression on standardised features, C by grouped CV log-loss; returns the weights and
    bias on the raw features (the standardisation folded in) and what was chosen."""
    from sklearn.linear_model import LogisticRegressionCV

    mean = train.features.mean(axis=0)
    std = np.maximum(train.features.std(axis=0), 1e-6)
    z = (train.features - mean) / std
    lr = LogisticRegressionCV(Cs=list(C_GRID), cv=splits, scoring="neg_log_loss", max_iter=3000, l1_ratios=(0.0,),
                              class_weight="balanced" if balanced else None, use_legacy_attributes=False)
    lr.fit(z, train.labels)
    scores = np.asarray(lr.scores_).reshape(len(splits), -1).mean(axis=0)  # folds x (one l1 ratio) x Cs -> Cs
    weight = lr.coef_ / std
    bias = lr.intercept_ - weight @ mean
    chosen = {"C": float(np.ravel(lr.C_)[0]), "cv_log_loss": float(-scores.max()), "folds": len(splits),
              "cv_log_loss_by_C": {f"{c:g}": round(float(-s), 4) for c, s in zip(C_GRID, scores)}}
    log.info("logistic regression: C=%g (grouped %d-fold CV log-loss %.4f)", chosen["C"], len(splits),
             chosen["cv_log_loss"])
    return weight, bias, chosen


def fit_knn(train: Embedded, splits: list) -> dict[str, Any]:
    """A k-NN on L2-normalised features (cosine similarity), k by grouped CV log-loss."""
    from sklearn.model_selection import GridSearchCV
    from sklearn.neighbors import KNeighborsClassifier

    unit = _unit(train.features)
    grid = [k for k in K_GRID if k < min(len(v) for _, v in splits) and k < len(unit)]
    search = GridSearchCV(KNeighborsClassifier(), {"n_neighbors": grid}, cv=splits, scoring="neg_log_loss")
    search.fit(unit, train.labels)
    chosen = {"k": int(search.best_params_["n_neighbors"]), "cv_log_loss": float(-search.best_score_)}
    log.info("k-NN: k=%d (grouped CV log-loss %.4f)", chosen["k"], chosen["cv_log_loss"])
    return {"model": search.best_estimator_, "chosen": chosen}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _set_head(net: torch.nn.Module, weight: np.ndarray, bias: np.ndarray, single_logit: bool, classes: int) -> None:
    """The fitted regression as the model's classifier layer: for two classes sklearn gives one logit w.x + b, which
    two outputs (-w/2, +w/2) reproduce exactly under the softmax."""
    head = net.get_classifier()
    w, b = torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
    if w.shape[0] == 1 and num_outputs(classes, single_logit) == 2:
        w, b = torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.device))
        head.bias.copy_(b.to(head.bias.device))


def _logits(net: torch.nn.Module, embedded: Embedded, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        feats = torch.as_tensor(embedded.features, device=device)
        return net.get_classifier()(feats).float().cpu(), torch.as_tensor(embedded.labels)


def _test(net: torch.nn.Module, test: Embedded, data: DataBundle, decision: Decision, run: RunFolder,
          device: torch.device, seed: int) -> dict[str, Any]:
    """``test_metrics.json`` and ``test_predictions.csv`` as a trained run writes them."""
    logits, targets = _logits(net, test, device)
    s = score(net, logits, targets)
    result = {"checkpoint": "checkpoints/best.pt", "epoch": 1, "split": "test", "num_images": len(test.labels),
              "loss": s.loss, "accuracy": s.accuracy, "balanced_accuracy": s.balanced_accuracy,
              "roc_auc": s.roc_auc if math.isfinite(s.roc_auc) else None, "decision": decision.to_dict()}
    write_json(run.test_metrics, result)
    write_predictions(run.test_predictions, data.splits["test"], decision.probabilities(logits).numpy(), data.classes,
                      data.root, decision.threshold)
    log.info("linear probe, test: loss %.4f  acc %.4f  balanced acc %.4f  ROC-AUC %.4f", s.loss, s.accuracy,
             s.balanced_accuracy, s.roc_auc)
    return result


def _knn_test(knn: dict[str, Any], test: Embedded, data: DataBundle, run: RunFolder, cfg: DictConfig) -> dict[str, Any]:
    """The k-NN's test scores with the same metrics, intervals and report as ``evaluate`` (``eval/knn_test/``)."""
    probs = knn["model"].predict_proba(_unit(test.features))
    samples = data.splits["test"]
    groups = interval_groups(cfg.dataset, samples, data.splits)
    result = evaluate_predictions(test.labels, probs, data.classes, None, 1000, seed=int(cfg.seed), groups=groups)
    clipped = np.clip(probs[np.arange(len(test.labels)), test.labels], 1e-7, 1.0)
    result = {"checkpoint": f"k-NN (k={knn['chosen']['k']}) on the probe's embeddings", "epoch": 1, "split": "test",
              "loss": float(-np.log(clipped).mean()), **result}
    out = run.evaluation("knn_test")
    write_json(out.metrics, result)
    write_predictions(out.predictions, samples, probs, data.classes, data.root)
    write_report(result, out.report, {})
    log.info("k-NN probe, test: acc %.4f  balanced acc %.4f  ROC-AUC %s", result["accuracy"]["value"],
             result["balanced_accuracy"]["value"], result.get("roc_auc", {}).get("value"))
    return {k: result[k]["value"] for k in ("accuracy", "balanced_accuracy", "roc_auc") if k in result}
