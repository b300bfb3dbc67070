"""torchvision's ResNet-18 as a modern baseline, adapted to any channel count."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18


def _adapt_stem(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """Fit RGB stem weights to ``in_channels``: summed for grayscale, tiled and rescaled otherwise."""
    weight = state.get("conv1.weight")
    if weight is None or weight.shape[1] == in_channels:
        return state
    if in_channels == 1:
        state["conv1.weight"] = weight.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_channels // weight.shape[1])
        state["conv1.weight"] = weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)
    return state


def resnet18(
    in_channels: int, num_outputs: int, image_size: Sequence[int], weights: str | None = None
) -> nn.Module:
    """ResNet-18, randomly initialised unless ``weights`` names a local state-dict file (nothing is downloaded).

    The classifier head of a weights file is dropped when its shape does not match ``num_outputs``.
    """
    del image_size  # global average pooling makes ResNet size-agnostic
    model = tv_resnet18(weights=None, num_classes=num_outputs)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no file at {path} (expected a ResNet-18 state dict saved with torch.save)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = _adapt_stem(dict(state), in_channels)
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in state and not k.startswith("fc.")]
        if missing:
            raise ValueError(f"model.weights: {path} is not a ResNet-18 state dict (missing {missing[:3]}...)")
        model.load_state_dict(state, strict=False)
    return model
