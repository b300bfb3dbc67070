"""A Keras-style model summary: layer, output shape and parameters, with the total."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def summary_rows(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, int]]:
    """(layer name and type, output shape, parameters) for every leaf layer, in execution order."""
    rows: list[tuple[str, str, int]] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def record(module, _inp, out):
        shape = "x".join(str(d) for d in out.shape[1:]) if isinstance(out, torch.Tensor) else "-"
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((f"{names[module]} ({type(module).__name__})", shape, params))

    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def summary_table(model: nn.Module, input_shape: Sequence[int]) -> str:
    """The summary as aligned text with trainable and total parameter counts."""
    rows = summary_rows(model, input_shape)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'layer':<{width}}{'output shape':<18}{'parameters':>12}", "-" * (width + 30)]
    lines += [f"{name:<{width}}{shape:<18}{params:>12,}" for name, shape, params in rows]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += ["-" * (width + 30), f"input {'x'.join(str(d) for d in input_shape)}; total parameters {total:,}; trainable {trainable:,}"]
    return "\n".join(lines)
