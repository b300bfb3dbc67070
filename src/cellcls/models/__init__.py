"""Model registry: every architecture the ``model=`` config group can name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cellcls.models.base import keras_init_
from cellcls.models.blood_cnn import blood_cnn
from cellcls.models.heads import num_outputs
from cellcls.models.lenet import lenet
from cellcls.models.resnet import resnet18
from cellcls.models.skin_cnn import skin_cnn
from cellcls.models.xray_cnn import xray_cnn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": lenet,
    "blood_cnn": blood_cnn,
    "skin_cnn": skin_cnn,
    "xray_cnn": xray_cnn,
    "resnet18": resnet18,
}


# keys every `model` config has; the rest are the architecture function's keyword arguments
MODEL_KEYS = ("name", "single_logit", "init")


def build_model(
    spec: Mapping[str, Any], in_channels: int, num_classes: int, image_size: Sequence[int]
) -> nn.Module:
    """Build the model named by ``spec['name']`` with the remaining keys as its keyword arguments.

    ``spec`` is the ``model`` config section (``name``, ``single_logit`` and architecture options).
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; choose one of {sorted(MODELS)}")
    outputs = num_outputs(num_classes, bool(spec.pop("single_logit", False)))
    init = spec.pop("init", "torch")
    if init not in ("keras", "torch"):
        raise ValueError(f"model.init={init!r} is not valid; allowed values: keras, torch")
    if init == "keras" and spec.get("weights"):
        raise ValueError("model.init=keras would overwrite the weights loaded from model.weights; use model.init=torch")
    model = MODELS[name](in_channels, outputs, list(image_size), **spec)
    return keras_init_(model) if init == "keras" else model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count, as Keras' ``model.summary()`` reports it."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def l2_penalty(model: nn.Module) -> torch.Tensor | float:
    """Keras-style kernel L2 terms the model declares (``coef * sum(w**2)``)."""
    terms = getattr(model, "l2_terms", None)
    return sum((coef * p.pow(2).sum() for p, coef in terms()), 0.0) if terms else 0.0
