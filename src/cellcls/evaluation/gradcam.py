"""Grad-CAM: where in the input the model looked for the class it scores (Selvaraju et al., 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def find_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The layer named ``name`` (as in ``model.named_modules()``), or the last convolution by default."""
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            raise ValueError(f"cam_layer={name!r} is not a layer of this model; convolution layers: {convs}")
        return modules[name]
    convs = [m for m in modules.values() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no convolution layer for Grad-CAM; name one with cam_layer=")
    return convs[-1]


def grad_cam(model: nn.Module, inputs: torch.Tensor, layer: nn.Module, target: torch.Tensor | None = None) -> torch.Tensor:
    """Heat maps ``N x H x W`` in [0, 1] at the input's resolution for class ``target`` (default: predicted).

    For a single-logit model the class-1 score is the logit and the class-0 score its negative.
    """
    store: dict[str, torch.Tensor] = {}
    tensor_hooks = []

    def keep(_module, _inp, out):
        tensor_hooks.append(out.register_hook(lambda grad: store.__setitem__("grad", grad)))
        store["act"] = out

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(inputs)
            if logits.shape[1] == 1:
                scores = torch.cat([-logits, logits], dim=1)
            else:
                scores = logits
            if target is None:
                target = scores.argmax(dim=1)
            model.zero_grad(set_to_none=True)
            scores.gather(1, target.view(-1, 1).to(scores.device)).sum().backward()
    finally:
        handle.remove()
        for h in tensor_hooks:  # the hook's closure holds the activation that holds the hook: break the cycle,
            h.remove()          # which autograd's C++ side would otherwise keep alive (0.3 MB per call)
        model.train(was_training)
    grad, act = store.pop("grad"), store.pop("act").detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cam.flatten(1)
    lo, hi = flat.min(dim=1).values.view(-1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1)
    return ((cam - lo) / (hi - lo).clamp_min(1e-12)).detach()
