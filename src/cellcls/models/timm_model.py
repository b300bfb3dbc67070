"""Any timm architecture as a cellcls model (``model=timm model.arch=<name>``), randomly initialised, with timm's
published weights (``model.pretrained=true``, through timm's own download cache) or with a local weights file
(``model.weights=<file>``). timm is the optional ``timm`` extra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cellcls.errors import ConfigError, nearest
from cellcls.models.weights import load_weights


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install 'cellcls[timm]'") from None
    return timm


def check_arch(arch: str) -> None:
    """Refuse a name timm does not know (a pretrained tag such as ``resnet18.a1_in1k`` is allowed)."""
    timm = _timm()
    known = timm.list_models()
    if arch.split(".")[0] not in known:
        raise ConfigError(f"model.arch={arch!r} is not a timm architecture{nearest(arch, known)} "
                          "(python -c 'import timm; print(timm.list_models())' lists them)")


def hub_cache(cache_dir: str | None) -> str:
    """Where timm keeps downloaded weights: ``cache_dir``, else Hugging Face's cache ($HF_HOME/hub)."""
    if cache_dir:
        return str(Path(cache_dir).expanduser())
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def timm_model(
    in_channels: int,
    num_outputs: int,
    image_size: Sequence[int],
    arch: str = "resnet18",
    pretrained: bool = False,
    weights: str | None = None,
    cache_dir: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """``timm.create_model(arch)`` with the data set's channels and classes.

    ``weights`` (a local torchvision/timm/cellcls state dict or ``.safetensors`` file) wins over ``pretrained``
    (timm's published weights for ``arch``, read from ``cache_dir`` or Hugging Face's cache, downloaded there when
    missing and online). Either way the stem is adapted to ``in_channels`` and a head of another size starts fresh.
    """
    timm = _timm()
    check_arch(arch)
    options: dict[str, Any] = {"num_classes": num_outputs, "in_chans": in_channels, "drop_rate": float(drop_rate)}
    if drop_path_rate is not None:
        options["drop_path_rate"] = float(drop_path_rate)
    try:
        model = timm.create_model(arch, pretrained=False, **options)
        if model.pretrained_cfg.get("fixed_input_size"):  # a ViT and kin: built for the data set's size instead
            options["img_size"] = tuple(image_size)
            model = timm.create_model(arch, pretrained=False, **options)
    except TypeError as exc:  # an option this architecture does not have
        raise ConfigError(f"model.arch={arch}: {exc} (drop it from the model settings)") from None
    if weights:
        cfg = model.pretrained_cfg
        load_weights(model, weights, first_conv=cfg.get("first_conv") or "", classifier=cfg.get("classifier") or "")
        return model
    if not pretrained:
        return model
    try:
        return timm.create_model(arch, pretrained=True, cache_dir=cache_dir, **options)
    except Exception as exc:  # noqa: BLE001 (the hub client, urllib and timm each raise their own "cannot fetch")
        raise ConfigError(
            f"model.pretrained=true: timm's published weights for {arch!r} could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Either download them once where "
            f"there is a connection (they are kept in {hub_cache(cache_dir)}; copy that folder here, or set "
            "model.cache_dir to it), or give a local file: model.weights=<a .safetensors or .pth state dict of "
            f"{arch}>") from None
