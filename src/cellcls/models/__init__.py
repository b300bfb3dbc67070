"""Model registry: every architecture the ``model=`` config group can name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from cellcls.config.checks import check_choice, check_unknown, signature_keys
from cellcls.models.base import he_init_, keras_init_
from cellcls.models.blood_cnn import blood_cnn
from cellcls.scoring.heads import num_outputs
from cellcls.models.lenet import lenet
from cellcls.models.resnet import resnet18
from cellcls.models.skin_cnn import skin_cnn
from cellcls.models.timm_model import timm_model
from cellcls.models.xray_cnn import xray_cnn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": lenet,
    "blood_cnn": blood_cnn,
    "skin_cnn": skin_cnn,
    "xray_cnn": xray_cnn,
    "resnet18": resnet18,
    "timm": timm_model,
}


# model.init: how a model from scratch starts (torch: each layer's own default)
INITS: dict[str, Callable[[nn.Module], nn.Module]] = {"torch": lambda m: m, "keras": keras_init_, "he": he_init_}

# keys every `model` config has; the rest are the architecture function's keyword arguments. `starting_weights` is
# written by the run (what the weights were before training: cellcls.models.pretrained.StartingWeights), not read.
# `tta` is the flip averaging a frozen-feature probe was fitted with (cellcls.training.probe): applied by default.
MODEL_KEYS = ("name", "single_logit", "init", "starting_weights", "tta")
# architecture options that fetch starting weights: a rebuilt trained model takes its weights from its checkpoint
WEIGHT_KEYS = ("weights", "pretrained")



def check_model_config(model: Mapping[str, Any]) -> None:
    """Refuse a ``model`` section naming no registered architecture, or a key neither cellcls nor the architecture
    function takes, naming the nearest valid one."""
    name = str(model.get("name"))
    check_choice("model.name", name, sorted(MODELS))
    check_unknown("model", list(model.keys()), [*MODEL_KEYS, *signature_keys(MODELS[name], skip=3)])


def build_model(
    spec: Mapping[str, Any], in_channels: int, num_classes: int, image_size: Sequence[int],
    starting_weights: bool = True,
) -> nn.Module:
    """Build the model named by ``spec['name']`` with the remaining keys as its keyword arguments.

    ``spec`` is the ``model`` config section (``name``, ``single_logit`` and architecture options). With
    ``starting_weights=False`` the architecture is built without loading ``weights``/``pretrained`` (a checkpoint's
    own weights follow).
    """
    spec = dict(spec)
    if not starting_weights:
        spec = {k: v for k, v in spec.items() if k not in WEIGHT_KEYS}
    spec.pop("starting_weights", None)
    spec.pop("tta", None)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; choose one of {sorted(MODELS)}")
    outputs = num_outputs(num_classes, bool(spec.pop("single_logit", False)))
    init = spec.pop("init", "torch")
    if init not in INITS:
        raise ValueError(f"model.init={init!r} is not valid; allowed values: {', '.join(INITS)}")
    if init != "torch" and (spec.get("weights") or spec.get("pretrained")):
        raise ValueError(f"model.init={init} would overwrite the starting weights (model.weights / model.pretrained); "
                         "use model.init=torch")
    model = MODELS[name](in_channels, outputs, list(image_size), **spec)
    return INITS[init](model)


def starting_statistics(spec: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    """The input (mean, std) of the pretrained weights ``spec`` starts from (timm's ``pretrained_cfg`` for its
    architecture), or None for a model that starts from random weights."""
    if spec.get("name") != "timm" or not (spec.get("pretrained") or spec.get("weights")):
        return None
    from cellcls.models.pretrained import weights_statistics

    return weights_statistics(str(spec.get("arch")))


def model_label(spec: Mapping[str, Any]) -> str:
    """The model's name for people (logs, model cards, hyper-parameter tables): ``timm:<arch>`` for a timm model."""
    return f"timm:{spec.get('arch')}" if spec.get("name") == "timm" else str(spec.get("name"))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count, as Keras' ``model.summary()`` reports it."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head (the rest is the backbone): a seed model's ``classifier``,
    torchvision's ``fc``, or what a timm model's ``pretrained_cfg`` names."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg and cfg.get("classifier"):
        names = cfg["classifier"]
        return tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    children = dict(model.named_children())
    for name in ("classifier", "fc", "head"):
        if name in children:
            return (f"{name}.",)
    raise ValueError(f"{type(model).__name__} has no classifier head cellcls can find (classifier, fc or head)")


def split_backbone(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(backbone, head) named parameters, for a backbone LR scale and freezing the backbone."""
    head = head_prefixes(model)
    named = list(model.named_parameters())
    return [p for p in named if not p[0].startswith(head)], [p for p in named if p[0].startswith(head)]
