"""Exporting a trained model to ONNX or TorchScript with its normalisation inside and its model card embedded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellcls.data.preprocessing import Normalize
from cellcls.deploy.runtimes import (
    CARD_KEY,
    OOD_OUTPUT,
    TS_EXTRA,
    card_path,
    jit_quiet,
    load_exported,
)
from cellcls.scoring.heads import Decision, num_outputs
from cellcls.scoring.multilabel import finding_probabilities
from cellcls.scoring.ood import METHOD, OODRule, statistic_layers, statistics_of
from cellcls.models.trained import LoadedModel
from cellcls.infra.run_folder import atomic_write, write_json

EXPORT_FORMAT = "cellcls-export/1"
FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class ExportModule(nn.Module):
    """The trained network with its normalisation in front and its decision rule's probabilities behind
    (temperature included; the threshold travels in the model card). With an out-of-distribution rule, a third
    output: each image's score (the squared Mahalanobis distance of its activation statistics), computed inside the
    graph from the rule's mean, scale and precision; the card holds the threshold."""

    def __init__(self, model: nn.Module, mean: list[float] | None, std: list[float] | None,
                 decision: Decision | None = None, ood: OODRule | None = None, plain: nn.Module | None = None,
                 multilabel: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multilabel = multilabel  # each finding's sigmoid, not a softmax over classes
        self.normalize = Normalize(mean, std)
        self.decision = decision or Decision()
        self.with_ood = ood is not None
        if ood is not None:
            # the statistics come from the plain network, as LoadedModel.assess computes them (model may average flips)
            self.plain = plain if plain is not None else model
            self.layers = statistic_layers(self.plain)
            self.register_buffer("ood_mean", ood.mean.float())
            self.register_buffer("ood_scale", ood.scale.float())
            self.register_buffer("ood_precision", ood.precision.float())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return finding_probabilities(logits) if self.multilabel else self.decision.probabilities(logits)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalize(image)
        logits = self.model(x)
        if not self.with_ood:
            return self.probabilities(logits), logits
        statistics = statistics_of(self.plain, x, self.layers)[0]
        z = (statistics - self.ood_mean) / self.ood_scale
        return self.probabilities(logits), logits, ((z @ self.ood_precision) * z).sum(dim=1)


def export_card(loaded: LoadedModel, fmt: str) -> dict[str, Any]:
    """The checkpoint's model card plus how to call the exported graph."""
    card = loaded.card
    spec = card["input"]
    single_logit = bool(loaded.config.model.single_logit)
    card.update(
        format=EXPORT_FORMAT,
        exported_as=fmt,
        graph={
            "input": {"name": "image", "dtype": "float32", "shape": ["N", spec["channels"], spec["height"], spec["width"]],
                      "range": [0.0, 1.0], "normalization": "inside the graph" if spec["mean"] is not None else "none"},
            "outputs": [{"name": "probabilities", "shape": ["N", len(loaded.classes)]},
                        {"name": "logits", "shape": ["N", num_outputs(len(loaded.classes), single_logit,
                                                                      loaded.multilabel)]}]
            + ([{"name": OOD_OUTPUT, "shape": ["N"]}] if loaded.ood is not None else []),
        },
    )
    if loaded.ood is not None:  # the score is computed in the graph; flag an image whose score is above threshold
        rule = loaded.ood
        card["ood"] = {"method": METHOD, "output": OOD_OUTPUT, "threshold": rule.threshold, "level": rule.level,
                       "fitted_on": rule.fitted_on}
    return card


def default_output(loaded: LoadedModel, fmt: str) -> Path:
    """``<run>/export/model.onnx`` (or ``model.torchscript.pt``, or the folder ``web/``) in the checkpoint's run."""
    return loaded.run.export(SUFFIXES[fmt]) if fmt in SUFFIXES else loaded.run.web_export


def export_model(loaded: LoadedModel, fmt: str, output: Path, opset: int = 18) -> Path:
    """Write ``loaded`` as ``fmt`` to ``output`` (and the card to ``<output>.json``); returns the model's path."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not valid; allowed values: {', '.join(FORMATS)}")
    prep = loaded.preprocessing
    # the scorer: a model that averages flips by default (a probe fitted on flip-averaged features) exports with them
    module = ExportModule(loaded.scorer, prep.mean, prep.std, loaded.decision, loaded.ood, loaded.model,
                          loaded.multilabel).to("cpu").eval()
    height, width = (int(v) for v in prep.image_size)
    example = torch.rand(2, int(prep.channels), height, width)
    card = export_card(loaded, fmt)
    try:
        if fmt == "onnx":
            proto = _onnx_program(module, example, card, opset)
            atomic_write(output, lambda fh: fh.write(proto.SerializeToString()))
        else:
            with torch.no_grad(), jit_quiet():
                traced = torch.jit.trace(module, example)
                atomic_write(output, lambda fh: torch.jit.save(traced, fh, _extra_files={TS_EXTRA: json.dumps(card)}))
    finally:
        loaded.model.to(loaded.device)
    write_json(card_path(output), card)
    return output


def _onnx_program(module: nn.Module, example: torch.Tensor, card: dict[str, Any], opset: int) -> Any:
    """The ONNX model (a protobuf) with a dynamic batch axis and the model card as metadata."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (example,), input_names=["image"],
        output_names=["probabilities", "logits", *([OOD_OUTPUT] if module.with_ood else [])],
        dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True, verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card)
    return proto


def max_difference(loaded: LoadedModel, exported_path: Path, batch: int = 3) -> float:
    """Largest absolute difference of class probabilities between the checkpoint and the exported file."""
    prep = loaded.preprocessing
    images = torch.randint(0, 256, (batch, int(prep.channels), *(int(v) for v in prep.image_size)), dtype=torch.uint8)
    exported = load_exported(exported_path, device="cpu")
    return float(abs(loaded.predict(images) - exported.predict(images)).max())
