"""The device-side input pipeline: same batches and loss as the per-image path, same augmentation statistics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    TINY,
    compose_config,
    malaria_images,
    train_in_process,
)
from scipy.stats import ks_2samp
from torchvision.transforms.v2 import functional as TF

from cellcls.data.batch_augment import BatchAugment
from cellcls.data.datamodule import build_data
from cellcls.data.dataset import load_image
from cellcls.data.device_loader import DeviceBatches
from cellcls.data.transforms import build_transform
from cellcls.errors import ConfigError
from cellcls.models import build_model
from cellcls.scoring.losses import ClassificationLoss

S1 = {"rotation": 20, "shift": 0.0, "shear": 0.2, "zoom": 0.2, "hflip": True, "vflip": False, "fill": 0}
EVERYTHING = {"rotation": 30, "shift": 0.15, "shear": 0.3, "zoom": 0.25, "hflip": True, "vflip": True, "fill": 40}


def bundle(pipeline: str, *extra: str, shard: tuple[int, int] | None = None):
    cfg = compose_config(*TINY, "dataset.mean=[0.5,0.4,0.3]", "dataset.std=[0.2,0.25,0.3]", *extra)
    return build_data(cfg.dataset, None, 7, torch.device("cpu"), pipeline, shard=shard)


def test_device_batches_equal_the_per_image_loaders_bit_for_bit_without_augmentation():
    device, loader = bundle("device", "dataset.shuffle=false"), bundle("loader", "dataset.shuffle=false")
    assert isinstance(device.loaders["train"], DeviceBatches)
    for split in ("train", "val", "test"):
        pairs = list(zip(device.loaders[split], loader.loaders[split], strict=True))
        assert pairs
        for (x_dev, y_dev), (x_cpu, y_cpu) in pairs:
            assert torch.equal(y_dev, y_cpu)
            assert torch.equal(x_dev, x_cpu)


def test_device_path_and_per_image_path_give_the_same_loss_on_the_same_batch():
    torch.manual_seed(0)
    model = build_model({"name": "lenet"}, 3, 2, [32, 32]).eval()  # no dropout: one forward pass per input
    loss = ClassificationLoss(2)
    device, loader = bundle("device", "dataset.shuffle=false"), bundle("loader", "dataset.shuffle=false")
    (x_dev, y_dev), (x_cpu, y_cpu) = next(iter(device.loaders["train"])), next(iter(loader.loaders["train"]))
    with torch.no_grad():
        assert float(loss(model(x_dev), y_dev)) == float(loss(model(x_cpu), y_cpu))


def test_shuffled_device_batches_cover_the_split_once_per_epoch_in_a_new_order():
    data = bundle("device", "dataset.batch_size=27")  # 81 images: no last batch of one, which training drops
    loader = data.loaders["train"]
    first = torch.cat([x.flatten(1)[:, :64] for x, _ in loader])
    second = torch.cat([x.flatten(1)[:, :64] for x, _ in loader])
    assert len(first) == len(data.splits["train"]) == len(second)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first.double().sum(0), second.double().sum(0))  # the same images, reordered


def test_batched_affine_reproduces_torchvisions_affine_and_flips_for_the_same_parameters():
    image = load_image(malaria_images(1)[0], 3, (64, 64)).float().div(255)
    batch = image.expand(8, -1, -1, -1).contiguous()
    aug = BatchAugment({**EVERYTHING, "fill": [10, 20, 30]})
    torch.manual_seed(3)
    p = aug.sample(8, 64, 64)
    out = aug.apply(batch.clone(), p)
    for i in range(8):
        ref = TF.affine(image, angle=float(p.angle[i]), translate=[int(p.tx[i]), int(p.ty[i])], scale=float(p.scale[i]),
                        shear=[float(p.shear[i]), 0.0], interpolation=TF.InterpolationMode.BILINEAR,
                        fill=[10 / 255, 20 / 255, 30 / 255])
        ref = TF.horizontal_flip(ref) if p.flip_x[i] < 0 else ref
        ref = TF.vertical_flip(ref) if p.flip_y[i] < 0 else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_flips_alone_are_exact_mirror_images():
    aug = BatchAugment({"hflip": True, "vflip": True})
    x = torch.rand(64, 3, 9, 11)
    torch.manual_seed(0)
    out = aug(x.clone())
    for i in range(64):
        assert any(torch.equal(out[i], cand) for cand in (x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1).flip(-2)))
    assert not torch.equal(out, x)


def image_statistics(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image brightness, intensity centroid (x, y) and the share of exactly-filled border pixels."""
    grey = images.float().mean(dim=1)
    h, w = grey.shape[-2:]
    total = grey.sum(dim=(1, 2)).clamp_min(1e-6)
    xs, ys = torch.arange(w).float(), torch.arange(h).float()
    return {
        "brightness": grey.mean(dim=(1, 2)).numpy(),
        "centroid_x": ((grey.sum(dim=1) * xs).sum(dim=1) / total).numpy(),
        "centroid_y": ((grey.sum(dim=2) * ys).sum(dim=1) / total).numpy(),
        "top_left_quadrant": grey[:, : h // 2, : w // 2].mean(dim=(1, 2)).numpy(),
    }


@pytest.mark.parametrize("settings", [S1, EVERYTHING], ids=["s1_malaria", "every_option"])
def test_batched_augmentation_has_the_per_image_paths_distributions(settings):
    # An asymmetric real cell (off-centre crop) so rotation, shift, zoom, shear and flips all move the statistics.
    cell = load_image(malaria_images(1)[0], 3, (64, 64))[:, 8:, 4:60]
    cell = TF.resize(cell, [48, 48], antialias=True)
    n = 1500
    per_image = build_transform(settings)
    torch.manual_seed(11)
    reference = torch.stack([per_image(cell) for _ in range(n)])
    torch.manual_seed(12)
    batched = BatchAugment(settings)(cell.float().div(255).expand(n, -1, -1, -1).contiguous())
    ref_stats, new_stats = image_statistics(reference), image_statistics(batched)
    for name in ref_stats:
        assert ks_2samp(ref_stats[name], new_stats[name]).pvalue > 0.001, name
    # and the augmentation does something: the statistics really vary
    assert ref_stats["centroid_x"].std() > 0.5


def test_the_prefetch_thread_ends_when_a_loop_breaks_early():
    loader = bundle("device").loaders["train"]
    before = sum(t.name == "cellcls-gather" for t in __import__("threading").enumerate())
    for i, _ in enumerate(loader):
        if i == 1:
            break
    import gc
    import threading
    import time

    gc.collect()
    deadline = time.monotonic() + 5
    while sum(t.name == "cellcls-gather" for t in threading.enumerate()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(t.name == "cellcls-gather" for t in threading.enumerate()) == before


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_under_torchrun_each_rank_gets_its_share_of_the_training_batches(pipeline):
    shares = [torch.cat([y for _, y in bundle(pipeline, shard=(2, rank)).loaders["train"]]) for rank in range(2)]
    total = len(bundle(pipeline).splits["train"])
    assert len(shares[0]) == len(shares[1]) == (total + 1) // 2


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_a_last_training_batch_of_one_image_is_dropped_so_batchnorm_can_train(pipeline):
    n = len(bundle(pipeline).splits["train"])
    data = bundle(pipeline, f"dataset.batch_size={n - 1}")  # n images in batches of n - 1 leave one over
    assert [len(y) for _, y in data.loaders["train"]] == [n - 1]
    assert len(data.loaders["train"]) == 1
    assert sum(len(y) for _, y in data.loaders["val"]) == len(data.splits["val"])  # evaluation keeps every image
    model = build_model({"name": "timm", "arch": "resnet10t"}, 3, 2, [32, 32]).train()
    images, _ = next(iter(data.loaders["train"]))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what the dropped batch would do
        model(images[:1])


def test_pipeline_settings_are_checked():
    with pytest.raises(ConfigError, match="trainer.pipeline='gpu' is not valid; allowed values: auto, device, loader"):
        bundle("gpu")
    with pytest.raises(ConfigError, match="trainer.pipeline=device reads the decoded cache: it needs dataset.cache=true"):
        bundle("device", "dataset.cache=false")


def test_training_with_the_loader_pipeline_still_works(tmp_path):
    train_in_process(tmp_path, *TINY, "trainer.max_epochs=1", "trainer.pipeline=loader")
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_torch_compile_path_trains_on_the_cpu(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.compile(lambda x: x * 2)(torch.ones(2))"],
                           capture_output=True, text=True, timeout=300, check=False)
    if probe.returncode != 0:
        pytest.skip(f"torch.compile does not work on this machine: {probe.stderr.strip().splitlines()[-1:]}")
    train_in_process(tmp_path, *TINY, "trainer.max_epochs=1", "trainer.compile=true")
    row = (tmp_path / "metrics.csv").read_text().splitlines()[1].split(",")
    assert np.isfinite(float(row[1]))


def test_the_benchmark_script_runs_end_to_end_on_a_tiny_synthetic_set(tmp_path):
    results = tmp_path / "BENCHMARKS.md"
    results.write_text((REPO / "docs" / "BENCHMARKS.md").read_text())
    before = results.read_text().splitlines()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "dataset.render.train_per_class=48",
         "dataset.render.test_per_class=16", "dataset.render.size=32", "dataset.image_size=[32,32]", "epochs=1",
         "naive_workers=1", f"output={results}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a/b" in done.stdout and "a/c" in done.stdout
    added = [line for line in results.read_text().splitlines() if line not in before]
    assert len(added) == 1 and added[0].startswith("| 20") and "scripts/benchmark.py" in added[0]


def test_the_benchmark_scaling_run_reports_each_size(tmp_path):
    results = tmp_path / "BENCHMARKS.md"
    results.write_text((REPO / "docs" / "BENCHMARKS.md").read_text())
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "benchmark.py"), "scaling=100,200", "dataset.render.size=32",
         "dataset.image_size=[32,32]", f"output={results}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training images: epoch") == 2


def test_batched_parameters_follow_torchvisions_random_affine_distributions():
    from torchvision.transforms import v2

    from cellcls.data.transforms import build_augment

    (affine, *_flips) = build_augment(EVERYTHING)
    assert isinstance(affine, v2.RandomAffine)
    n, image = 3000, torch.zeros(3, 40, 50)
    torch.manual_seed(5)
    drawn = [affine.make_params([image]) for _ in range(n)]
    reference = {
        "angle": [d["angle"] for d in drawn], "tx": [d["translate"][0] for d in drawn],
        "ty": [d["translate"][1] for d in drawn], "scale": [d["scale"] for d in drawn],
        "shear": [d["shear"][0] for d in drawn],
    }
    assert all(d["shear"][1] == 0 for d in drawn)
    torch.manual_seed(6)
    p = BatchAugment(EVERYTHING).sample(n, 40, 50)
    for name, values in reference.items():
        ours = getattr(p, name).numpy()
        assert ks_2samp(values, ours).pvalue > 0.001, name
        assert min(values) >= ours.min() - 1 and max(values) <= ours.max() + 1, name
    assert abs(float((p.flip_x < 0).double().mean()) - 0.5) < 0.05
    assert abs(float((p.flip_y < 0).double().mean()) - 0.5) < 0.05
