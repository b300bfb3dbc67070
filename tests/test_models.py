"""The seed architectures match the tutorials' layer lists and parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18 as tv_resnet18

from cellcls.errors import ConfigError
from cellcls.models import build_model, count_parameters


def layer_signature(model: nn.Module) -> list[str]:
    """Conv/pool/dense layers in order, as a Keras summary lists them."""
    sig = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            sig.append(f"conv{m.out_channels}/{m.padding if isinstance(m.padding, str) else 'valid'}")
        elif isinstance(m, nn.MaxPool2d):
            sig.append("pool")
        elif isinstance(m, nn.Linear):
            sig.append(f"dense{m.out_features}")
        elif isinstance(m, nn.Dropout):
            sig.append(f"dropout{m.p}")
    return sig


@pytest.mark.parametrize(
    ("spec", "channels", "classes", "size", "expected"),
    [
        ({"name": "lenet"}, 3, 2, (128, 128), 467_026),
        ({"name": "xray_cnn", "single_logit": True}, 1, 2, (500, 500), 1_467_137),
        ({"name": "blood_cnn"}, 3, 4, (80, 80), 10_702_788),
        ({"name": "skin_cnn"}, 3, 2, (240, 240), 11_174_562),
    ],
)
def test_seed_models_have_the_tutorials_parameter_counts(spec, channels, classes, size, expected):
    assert count_parameters(build_model(spec, channels, classes, size)) == expected


def test_lenet_layers_are_in_the_tutorials_order():
    model = build_model({"name": "lenet"}, 3, 2, (128, 128))
    assert layer_signature(model) == [
        "conv8/same", "pool", "conv16/same", "pool", "conv32/valid", "pool", "dense64", "dropout0.5", "dense2",
    ]


def test_blood_cnn_layers_are_in_the_tutorials_order():
    model = build_model({"name": "blood_cnn"}, 3, 4, (80, 80))
    assert layer_signature(model) == [
        "conv80/valid", "conv64/valid", "pool", "conv64/valid", "dropout0.25", "dense128", "dropout0.5", "dense4",
    ]


def test_skin_cnn_layers_are_in_the_tutorials_order():
    model = build_model({"name": "skin_cnn"}, 3, 2, (240, 240))
    assert layer_signature(model) == [
        "conv16/valid", "pool", "conv32/valid", "pool", "conv64/valid", "pool", "conv128/valid", "pool",
        "dropout0.5", "dense512", "dense2",
    ]


def test_xray_cnn_layers_and_flatten_size_match_the_tutorial():
    model = build_model({"name": "xray_cnn", "single_logit": True}, 1, 2, (500, 500))
    assert layer_signature(model) == [
        "conv32/valid", "pool", "conv32/valid", "pool", "conv32/valid", "pool", "conv64/valid", "pool",
        "conv64/valid", "pool", "dense128", "dense64", "dense1",
    ]
    assert model.classifier[0].in_features == 13 * 13 * 64


@pytest.mark.parametrize("name", ["lenet", "blood_cnn", "skin_cnn", "xray_cnn", "resnet18"])
@pytest.mark.parametrize(("channels", "size"), [(1, (100, 100)), (3, (112, 144))])
def test_every_model_builds_for_any_input_size_and_channel_count(name, channels, size):
    model = build_model({"name": name}, channels, 3, size).eval()
    out = model(torch.rand(2, channels, *size))
    assert out.shape == (2, 3)


def test_single_logit_head_emits_one_output_for_a_binary_task():
    model = build_model({"name": "lenet", "single_logit": True}, 3, 2, (64, 64))
    assert model(torch.rand(4, 3, 64, 64)).shape == (4, 1)


def test_single_logit_with_more_than_two_classes_is_refused():
    with pytest.raises(ValueError, match="single_logit"):
        build_model({"name": "xray_cnn", "single_logit": True}, 1, 4, (128, 128))


def test_an_input_too_small_for_the_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        build_model({"name": "xray_cnn"}, 1, 2, (32, 32))


def test_unknown_model_names_the_allowed_ones():
    with pytest.raises(ValueError, match="lenet"):
        build_model({"name": "vgg99"}, 3, 2, (64, 64))


def test_skin_cnn_declares_the_keras_l2_penalty_on_its_dense_kernel():
    model = build_model({"name": "skin_cnn"}, 3, 2, (240, 240))
    terms = list(model.l2_terms())
    assert len(terms) == 1
    param, coef = terms[0]
    assert coef == pytest.approx(0.001)
    assert param is model.classifier[1].weight and param.shape == (512, 13 * 13 * 128)


def test_resnet18_loads_local_weights_and_adapts_them_to_grayscale(tmp_path):
    reference = tv_resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    model = build_model({"name": "resnet18", "weights": str(path)}, 1, 2, (64, 64))
    torch.testing.assert_close(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert model.fc.out_features == 2


def test_resnet18_weights_file_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.weights: no file at"):
        build_model({"name": "resnet18", "weights": str(tmp_path / "missing.pt")}, 3, 2, (64, 64))
