"""Local weights files for ``model.weights``: read any common layout and load it into a model, adapting the stem to
the data's channel count and dropping a classifier head whose shape does not fit.

One reader for torchvision and timm state dicts (``torch.save`` files or ``.safetensors``), training checkpoints that
wrap them (``state_dict``, ``model``, ``state_dict_ema`` keys; DDP's ``module.`` prefix) and cellcls checkpoints.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

from cellcls.errors import ConfigError

log = logging.getLogger(__name__)

# where a training checkpoint keeps its weights, in order of preference (an EMA copy is what was validated)
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; raises :class:`ConfigError` naming ``model.weights`` and the file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.weights: no file at {file} (expected a state dict saved with torch.save, a "
                          ".safetensors file or a cellcls checkpoint)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        # torch's own first line advises weights_only=False, which would run the file's code: never pass that on
        why = ("it holds pickled Python objects (code could run on loading), so it is refused for safety"
               if "Unsupported global" in str(exc) or "GLOBAL" in str(exc) else
               f"not a PyTorch or safetensors file, or corrupt ({file.stat().st_size:,} bytes)")
        raise ConfigError(f"model.weights: {file} is not a readable weights file: {why}; expected a torch.save "
                          "state dict, a .safetensors file or a cellcls checkpoint") from None
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict) and state[key]:
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {file} holds no state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a first convolution's RGB kernel to ``in_channels``: summed for greyscale (a grey image is R = G = B, so
    the response is unchanged), tiled and rescaled otherwise."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_weights(model: nn.Module, path: str | Path, first_conv: str, classifier: str) -> list[str]:
    """Load the weights file ``path`` into ``model``; returns the names left at their initial values (the head,
    when its shape differs: a new task). Every other parameter must be in the file, with the same shape."""
    return load_state(model, read_state_dict(path), str(path), first_conv, classifier)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, first_conv: str, classifier: str) -> list[str]:
    """:func:`load_weights` for tensors already read (``path`` names their origin in messages)."""
    state = dict(state)
    stem = f"{first_conv}.weight"
    own = model.state_dict()
    if stem in state and stem in own:
        state[stem] = adapt_stem(state[stem], own[stem].shape[1])
    head = tuple(f"{c}." for c in (classifier if isinstance(classifier, (list, tuple)) else [classifier]))
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not k.startswith(head)]
    if missing:
        wrong = [k for k in missing if k in state]
        detail = (f"{len(wrong)} tensors of another shape, e.g. {wrong[0]} {tuple(state[wrong[0]].shape)} vs "
                  f"{tuple(own[wrong[0]].shape)}") if wrong else f"{len(missing)} tensors missing, e.g. {missing[0]}"
        raise ConfigError(f"model.weights: {path} does not hold weights of this architecture ({detail})")
    model.load_state_dict(fitting, strict=False)
    fresh = [k for k in own if k not in fitting]
    if fresh:
        log.info("model.weights: loaded %d tensors from %s; %s start fresh (the head of a new task)",
                 len(fitting), path, ", ".join(fresh))
    return fresh
