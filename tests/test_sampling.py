"""``dataset.sampler=balanced``: every class equally likely in the training batches, on both input pipelines,
seeded by the epoch (resumable) and shared out under torchrun."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import compose_config, real_dataset

from cellcls.data.datamodule import build_data
from cellcls.data.sampling import BalancedSampler
from cellcls.errors import ConfigError
from cellcls.training.validate import validate

LABELS = [0] * 90 + [1] * 10


def test_each_class_is_drawn_about_equally_often_however_rare():
    sampler = BalancedSampler(LABELS * 50, ["common", "rare"], seed=0)
    draws = torch.as_tensor([LABELS[i % 100] for i in sampler])
    assert len(draws) == 5000 and 0.46 < float(draws.float().mean()) < 0.54


def test_an_epoch_draws_the_same_order_again_and_the_next_epoch_another():
    a, b = BalancedSampler(LABELS, ["c", "r"], seed=3), BalancedSampler(LABELS, ["c", "r"], seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)  # a resumed epoch sees the images its interrupted run saw
    b.set_epoch(5)
    assert list(a) != list(b)


def test_under_torchrun_the_processes_share_one_draw():
    whole = list(BalancedSampler(LABELS, ["c", "r"], seed=1))
    shares = [list(BalancedSampler(LABELS, ["c", "r"], seed=1, shard=(2, rank))) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 50
    assert [i for pair in zip(*shares) for i in pair] == whole


def test_a_class_without_training_images_is_refused_by_name():
    with pytest.raises(ConfigError, match="no images of Parasitized"):
        BalancedSampler([0, 0, 0], ["Uninfected", "Parasitized"], seed=0)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Real malaria cells, 1 Parasitized in 10."""
    cells = real_dataset("malaria") / "cell_images"
    root = tmp_path_factory.mktemp("imbalanced")
    for name, n in (("Uninfected", 72), ("Parasitized", 8)):
        (root / name).mkdir()
        for f in sorted((cells / name).glob("*.png"))[:n]:
            shutil.copy2(f, root / name / f.name)
    return root


def parasitized_share(root, pipeline: str, *settings: str) -> float:
    cfg = compose_config("dataset.name=folder", f"dataset.root={root}", "dataset.image_size=[24,24]",
                         "dataset.batch_size=8", "dataset.val_fraction=0.25", "dataset.classes=[Uninfected,Parasitized]",
                         *settings)
    data = build_data(cfg.dataset, None, 7, torch.device("cpu"), pipeline)
    seen = []
    for epoch in range(8):
        if data.train_sampler is not None:
            data.train_sampler.set_epoch(epoch)
        seen += [y for _, y in data.loaders["train"]]
    return float(torch.cat(seen).float().mean())


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_training_batches_of_an_imbalanced_real_set_are_balanced_on_both_pipelines(imbalanced, pipeline):
    assert parasitized_share(imbalanced, pipeline) < 0.2  # as the folders hold them
    assert 0.4 < parasitized_share(imbalanced, pipeline, "dataset.sampler=balanced") < 0.6


def test_a_balanced_sampler_with_a_fixed_order_or_an_unknown_sampler_is_refused(imbalanced):
    with pytest.raises(ConfigError, match="dataset.shuffle=true"):
        parasitized_share(imbalanced, "device", "dataset.sampler=balanced", "dataset.shuffle=false")
    with pytest.raises(ConfigError, match="dataset.sampler.*balanced"):
        validate(compose_config("dataset.sampler=balance"))
