"""model=timm: any timm architecture with the data set's channels and classes, starting from a local weights file
or from timm's download cache (nothing is downloaded: the tests write the files themselves)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from cellcls.errors import ConfigError
from cellcls.models import build_model, model_label, split_backbone

TIMM = {"name": "timm", "arch": "resnet18"}


@pytest.fixture
def offline(monkeypatch):
    """The Hugging Face client as on a machine without a connection (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def published(arch: str = "resnet18") -> torch.nn.Module:
    """What timm's published ImageNet weights look like: 3 channels, 1000 classes (random values)."""
    torch.manual_seed(0)
    return timm.create_model(arch)


def assert_backbone_equal(model: torch.nn.Module, source: torch.nn.Module, skip_stem: bool = False) -> None:
    theirs = source.state_dict()
    head = tuple(f"{c}." for c in [source.pretrained_cfg["classifier"]])
    stem = source.pretrained_cfg["first_conv"] + ".weight"
    for name, tensor in model.state_dict().items():
        if name.startswith(head) or (skip_stem and name == stem):
            continue
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)


def test_a_timm_model_takes_the_data_sets_channels_and_classes():
    model = build_model({**TIMM, "arch": "efficientnet_b0"}, 1, 3, [64, 64])
    assert model.conv_stem.in_channels == 1 and model.classifier.out_features == 3
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    assert model_label({**TIMM, "arch": "efficientnet_b0"}) == "timm:efficientnet_b0"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_into_the_backbone_and_a_new_head_starts_fresh(tmp_path, suffix):
    source = published()
    path = tmp_path / f"resnet18{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model({**TIMM, "weights": str(path)}, 3, 2, [64, 64])
    assert_backbone_equal(model, source)
    assert model.fc.out_features == 2


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_norm_keeps_the_starting_weights_batchnorm_through_training(tmp_path, freeze):
    source = published()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model({**TIMM, "weights": str(path), "freeze_norm": freeze}, 3, 2, [64, 64])
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn1.")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(4, 3, 64, 64) * 3).logsumexp(1).mean().backward()
        optimizer.step()
    after = model.state_dict()
    kept = all(torch.equal(after[k], v) for k, v in before.items() if k in after)
    assert kept is freeze  # statistics and scale as the weights brought them, or updated by training
    assert torch.equal(before["bn1.running_mean"], source.state_dict()["bn1.running_mean"])
    rebuilt = build_model({**TIMM, "freeze_norm": freeze}, 3, 2, [64, 64], starting_weights=False)
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint's weights fit the model its spec rebuilds


def test_local_weights_are_adapted_to_greyscale_by_summing_the_stem(tmp_path):
    source = published()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model({**TIMM, "weights": str(tmp_path / "w.pt")}, 1, 2, [64, 64])
    assert_backbone_equal(model, source, skip_stem=True)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))


def test_a_training_checkpoint_wrapping_the_weights_is_read_through_its_model_key(tmp_path):
    source = published()
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ck.pt")
    model = build_model({**TIMM, "weights": str(tmp_path / "ck.pt")}, 3, 1000, [64, 64])
    assert_backbone_equal(model, source)
    torch.testing.assert_close(model.fc.weight, source.fc.weight)  # a head of the same shape is kept


def test_weights_of_another_architecture_are_refused_with_what_differs(tmp_path):
    torch.save(published("resnet10t").state_dict(), tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"model.weights: .*other.pt does not hold weights of this architecture"):
        build_model({**TIMM, "weights": str(tmp_path / "other.pt")}, 3, 2, [64, 64])


def test_a_file_that_is_not_weights_is_refused_by_name(tmp_path):
    (tmp_path / "notes.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="notes.pt is not a readable weights file"):
        build_model({**TIMM, "weights": str(tmp_path / "notes.pt")}, 3, 2, [64, 64])


def test_a_weights_file_that_would_run_code_is_refused_for_safety_without_torchs_advice(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"conv.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="evil.pt is not a readable weights file: it holds pickled Python objects "
                                          r"\(code could run on loading\), so it is refused for safety") as err:
        build_model({**TIMM, "weights": str(tmp_path / "evil.pt")}, 3, 2, [64, 64])
    assert "weights_only" not in str(err.value) and not (tmp_path / "pwned").exists()  # torch's advice would run it


def write_hub_cache(cache: Path, source: torch.nn.Module) -> Path:
    """The file where Hugging Face's client keeps timm's weights after a download (repo, ref and snapshot)."""
    repo = cache / ("models--" + source.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    path = repo / "snapshots" / commit / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path


def test_pretrained_weights_are_read_from_timms_cache_without_a_connection(tmp_path, offline):
    source = published()
    write_hub_cache(tmp_path / "hub", source)
    model = build_model({**TIMM, "pretrained": True, "cache_dir": str(tmp_path / "hub")}, 3, 2, [64, 64])
    assert_backbone_equal(model, source)


def test_pretrained_offline_without_a_cached_copy_names_both_ways_out(tmp_path, offline):
    with pytest.raises(ConfigError) as err:
        build_model({**TIMM, "pretrained": True, "cache_dir": str(tmp_path / "empty")}, 3, 2, [64, 64])
    message = str(err.value)
    assert "could not be loaded" in message and str(tmp_path / "empty") in message and "model.weights=" in message


def test_a_model_rebuilt_from_its_checkpoint_does_not_fetch_its_starting_weights(tmp_path, offline):
    spec = {**TIMM, "pretrained": True, "cache_dir": str(tmp_path / "empty"), "weights": None}
    model = build_model(spec, 3, 2, [64, 64], starting_weights=False)
    assert model.fc.out_features == 2


def test_an_unknown_architecture_is_refused_with_the_nearest_name():
    with pytest.raises(ConfigError, match="model.arch='resnet181' is not a timm architecture; did you mean"):
        build_model({**TIMM, "arch": "resnet181"}, 3, 2, [64, 64])


@pytest.mark.parametrize(("spec", "head"), [({"name": "lenet"}, "classifier."), ({"name": "resnet18"}, "fc."),
                                            ({**TIMM, "arch": "efficientnet_b0"}, "classifier.")])
def test_every_model_splits_into_a_backbone_and_its_classifier_head(spec, head):
    backbone, heads = split_backbone(build_model(spec, 3, 2, [64, 64]))
    assert heads and all(n.startswith(head) for n, _ in heads)
    assert backbone and not any(n.startswith(head) for n, _ in backbone)


def test_a_fixed_size_architecture_is_built_for_the_data_sets_image_size():
    model = build_model({**TIMM, "arch": "vit_tiny_patch16_224"}, 3, 2, [64, 96])
    assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 2)
