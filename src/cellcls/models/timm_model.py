"""Any timm architecture as a cellcls model (``model=timm model.arch=<name>``), randomly initialised, with ImageNet
weights (``model.pretrained=true``: timm's download cache, an installed weight package or timm's hub, see
:mod:`cellcls.models.pretrained`) or with a local weights file (``model.weights=<file>``). The model's
``starting_weights`` attribute records what it started from. timm is the optional ``timm`` extra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cellcls.errors import ConfigError, nearest
from cellcls.models.pretrained import (
    PACKAGES,
    StartingWeights,
    cached_file,
    describe_ways_out,
    package_state_dict,
    record_of,
)
from cellcls.models.weights import load_state, load_weights


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
    head_init: str = "zero",
    freeze_norm: bool = False,
) -> nn.Module:
    """``timm.create_model(arch)`` with the data set's channels and classes.

    ``weights`` (a local torchvision/timm/cellcls state dict or ``.safetensors`` file) wins over ``pretrained``
    (ImageNet weights for ``arch``: timm's cache in ``cache_dir`` or Hugging Face's, an installed weight package,
    else a download). Either way the stem is adapted to ``in_channels`` and a head of another size starts fresh:
    at zero (``head_init=zero``), so the first logits are 0 and the backbone gets no gradient until the head has
    learnt something (timm's own start, ``head_init=timm``, is uniform +-1/sqrt(classes): logits of +-6 on pretrained
    features for two classes, a first loss near 3.5 and large first gradients into the backbone).
    ``freeze_norm`` turns every BatchNorm into timm's frozen one: the starting weights' statistics and scale stay as
    they are, in training too (fine-tuning on small batches of a small data set).
    """
    if head_init not in ("zero", "timm"):
        raise ConfigError(f"model.head_init={head_init!r} is not valid; allowed values: zero, timm")
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
    cfg = model.pretrained_cfg
    first_conv, classifier = cfg.get("first_conv") or "", cfg.get("classifier") or ""
    model = _starting_weights(timm, model, arch, options, weights, pretrained, cache_dir, first_conv, classifier)
    head = model.get_classifier()
    if head_init == "zero" and getattr(model, "starting_weights", None) is not None and model.fresh_head \
            and isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    if freeze_norm:  # after the starting weights: their statistics are what is kept
        model = timm.layers.freeze_batch_norm_2d(model)
    return model


def _starting_weights(timm: Any, model: nn.Module, arch: str, options: dict[str, Any], weights: str | None,
                      pretrained: bool, cache_dir: str | None, first_conv: str, classifier: str) -> nn.Module:
    """``model`` with its starting weights and their record (``starting_weights``), and ``fresh_head``: whether
    the classifier did not come with them (another class count)."""
    cfg = model.pretrained_cfg
    model.fresh_head = True
    if weights:
        fresh = load_weights(model, weights, first_conv=first_conv, classifier=classifier)
        model.fresh_head = any(name.startswith(_prefixes(classifier)) for name in fresh)
        model.starting_weights = record_of("file", str(weights), Path(weights).expanduser())
        return model
    if not pretrained:
        return model
    hub_id = cfg.get("hf_hub_id")
    published_classes = int(cfg.get("num_classes") or 1000)
    cached = cached_file(hub_id, cache_dir)
    if cached is not None:  # a download left them here: no connection needed
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **options)
        model.fresh_head = options["num_classes"] != published_classes
        model.starting_weights = record_of("timm-cache", str(hub_id), cached)
        return model
    package = PACKAGES.get(arch.split(".")[0])
    installed = package.file() if package is not None else None
    if package is not None and installed is not None:
        fresh = load_state(model, package_state_dict(package, installed), str(installed), first_conv, classifier)
        model.fresh_head = any(name.startswith(_prefixes(classifier)) for name in fresh)
        model.starting_weights = record_of("package", package.label(), installed)
        return model
    try:
        model = timm.create_model(arch, pretrained=True, cache_dir=cache_dir, **options)
    except Exception as exc:  # noqa: BLE001 (the hub client, urllib and timm each raise their own "cannot fetch")
        raise ConfigError(
            f"model.pretrained=true: weights for {arch!r} could not be loaded (timm's hub: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). {describe_ways_out(arch.split('.')[0], hub_cache(cache_dir))}"
        ) from None
    model.fresh_head = options["num_classes"] != published_classes
    downloaded = cached_file(hub_id, cache_dir)
    model.starting_weights = record_of("timm-hub", str(hub_id), downloaded) if downloaded else \
        StartingWeights("timm-hub", str(hub_id), "", "")
    return model


def _prefixes(classifier: str | Sequence[str]) -> tuple[str, ...]:
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)
