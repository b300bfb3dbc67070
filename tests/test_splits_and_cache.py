"""Patient-grouped splits, the decoded cache, unreadable images, and where augmentation applies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_config, copy_images, real_dataset, train_in_process
from PIL import Image

from cellcls.data.cache import decode_split
from cellcls.data.datamodule import (
    build_data,
    make_splits,
    resolve_root,
)
from cellcls.data.layouts import scan
from cellcls.data.layouts.folders import scan_split
from cellcls.data.transforms import build_augment
from cellcls.errors import DataError
from cellcls.paths import cache_dir


def patient(path, pattern):
    return re.search(pattern, path.name).group(1)


def splits_of(*overrides):
    cfg = compose_config(*overrides)
    scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
    return make_splits(cfg.dataset, scanned.splits, scanned.classes, int(cfg.seed))[0], cfg


def test_malaria_is_split_by_patient_so_no_patient_is_on_two_sides():
    splits, cfg = splits_of("dataset=malaria", f"dataset.root={real_dataset('malaria')}")
    groups = {name: {patient(p, cfg.dataset.group_pattern) for p in s.paths} for name, s in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert all(set(s.labels) == {0, 1} for s in splits.values())
    total = sum(len(s) for s in splits.values())
    assert 0.05 < len(splits["val"]) / total < 0.16 and 0.05 < len(splits["test"]) / total < 0.16


def test_an_image_level_split_puts_patients_on_both_sides_as_the_tutorial_did():
    splits, cfg = splits_of("dataset=malaria", f"dataset.root={real_dataset('malaria')}", "dataset.split_by=image")
    train = {patient(p, cfg.dataset.group_pattern) for p in splits["train"].paths}
    val = {patient(p, cfg.dataset.group_pattern) for p in splits["val"].paths}
    assert train & val


def test_pneumonia_without_a_val_folder_holds_out_whole_patients(tmp_path):
    src = real_dataset("pneumonia") / "chest_xray"
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            copy_images(src / split / cls, tmp_path / "chest_xray" / split / cls, 500)
    splits, cfg = splits_of("dataset=pneumonia", f"dataset.root={tmp_path}")
    train = {patient(p, cfg.dataset.group_pattern) for p in splits["train"].paths}
    val = {patient(p, cfg.dataset.group_pattern) for p in splits["val"].paths}
    assert val and not train & val


def test_the_split_is_seeded():
    root = real_dataset("malaria")
    a, _ = splits_of("dataset=malaria", f"dataset.root={root}", "seed=1")
    b, _ = splits_of("dataset=malaria", f"dataset.root={root}", "seed=1")
    c, _ = splits_of("dataset=malaria", f"dataset.root={root}", "seed=2")
    assert a["val"].paths == b["val"].paths and a["val"].paths != c["val"].paths


@pytest.fixture()
def small_set(tmp_path):
    src = real_dataset("malaria") / "cell_images"
    for cls in ("Parasitized", "Uninfected"):
        copy_images(src / cls, tmp_path / "data" / cls, 12)
    return tmp_path / "data"


def test_the_cache_decodes_once_and_later_reads_decode_nothing(small_set):
    samples = scan_split(small_set, ["Uninfected", "Parasitized"])
    first = decode_split(samples, 3, (32, 32), cache_dir(), progress=False)
    second = decode_split(samples, 3, (32, 32), cache_dir(), progress=False)
    assert first.decoded == 24 and second.decoded == 0 and second.file == first.file
    pixels = np.load(first.file, mmap_mode="r")
    assert isinstance(pixels, np.memmap) and pixels.shape == (24, 3, 32, 32) and pixels.dtype == np.uint8
    reference = np.asarray(Image.open(samples.paths[5]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(pixels[5].transpose(1, 2, 0).astype(int) - reference.astype(int)).max() <= 1


def test_touching_or_adding_a_file_invalidates_the_cache(small_set):
    samples = scan_split(small_set, ["Uninfected", "Parasitized"])
    decode_split(samples, 3, (32, 32), cache_dir(), progress=False)
    touched = samples.paths[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert decode_split(samples, 3, (32, 32), cache_dir(), progress=False).decoded == 24
    copy_images(real_dataset("malaria") / "cell_images" / "Uninfected", small_set / "Uninfected", 13)
    grown = scan_split(small_set, ["Uninfected", "Parasitized"])
    assert decode_split(grown, 3, (32, 32), cache_dir(), progress=False).decoded == 25


def test_other_size_or_channels_get_their_own_cache_entry(small_set):
    samples = scan_split(small_set, ["Uninfected", "Parasitized"])
    a = decode_split(samples, 3, (32, 32), cache_dir(), progress=False)
    b = decode_split(samples, 1, (32, 32), cache_dir(), progress=False)
    c = decode_split(samples, 3, (40, 32), cache_dir(), progress=False)
    assert len({a.file, b.file, c.file}) == 3 and b.decoded == c.decoded == 24


def test_corrupt_and_truncated_images_are_skipped_listed_and_the_run_goes_on(tmp_path, small_set):
    (small_set / "Parasitized" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = sorted((small_set / "Uninfected").glob("*.png"))[0].read_bytes()
    (small_set / "Uninfected" / "truncated.png").write_bytes(good[: len(good) // 2])
    run = tmp_path / "run"
    train_in_process(run, "dataset=folder", f"dataset.root={small_set}", "dataset.splits.train=[.]",
                     "dataset.image_size=[32,32]", "dataset.val_fraction=0.25", "trainer.max_epochs=1",
                     "trainer.progress_bar=false")
    listed = (run / "skipped_files.txt").read_text()
    assert "corrupt.png" in listed and "truncated.png" in listed
    assert (run / "checkpoints" / "last.pt").is_file()
    used = (run / "splits" / "train.csv").read_text() + (run / "splits" / "val.csv").read_text()
    assert "corrupt.png" not in used and "truncated.png" not in used


def test_a_split_left_without_a_class_after_skipping_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "train" / "a" / f"{i}.png")
        (tmp_path / "train" / "b" / f"{i}.png").write_bytes(b"broken")
    cfg = compose_config("dataset=folder", f"dataset.root={tmp_path}", "dataset.image_size=[8,8]",
                         "dataset.val_fraction=0.5")
    with pytest.raises(DataError, match=r"no readable images of class\(es\) \['b'\]"):
        build_data(cfg.dataset, cfg.augment, 0, torch.device("cpu"))


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_only_the_training_split_is_augmented(pipeline):
    cfg = compose_config(*TINY, "augment=s1_malaria", "dataset.shuffle=false")
    data = build_data(cfg.dataset, cfg.augment, 0, torch.device("cpu"), pipeline)

    def epoch(split: str) -> torch.Tensor:
        return torch.cat([x for x, _ in data.loaders[split]])

    for split in ("val", "test"):
        assert torch.equal(epoch(split), epoch(split))
    assert not torch.equal(epoch("train"), epoch("train"))


@pytest.mark.parametrize(
    ("option", "degrees", "translate", "scale", "shear", "flips"),
    [
        ("s0_blood_224", [0, 0], None, [0.8, 1.2], [-11.459, 11.459], {"RandomHorizontalFlip", "RandomVerticalFlip"}),
        ("s1_malaria", [-20, 20], None, [0.8, 1.2], [-11.459, 11.459], {"RandomHorizontalFlip"}),
        ("s2_blood_80", [-10, 10], [0.1, 0.1], None, None, {"RandomHorizontalFlip"}),
        ("s4_pneumonia", [0, 0], None, [0.8, 1.2], [-11.459, 11.459], {"RandomHorizontalFlip"}),
    ],
)
def test_each_seed_augmentation_maps_the_keras_settings(option, degrees, translate, scale, shear, flips):
    cfg = compose_config(f"augment={option}")
    affine, *rest = build_augment(dict(cfg.augment))
    assert list(affine.degrees) == pytest.approx(degrees)
    assert (list(affine.translate) if affine.translate else None) == translate
    assert (list(affine.scale) if affine.scale else None) == (pytest.approx(scale) if scale else None)
    assert (list(affine.shear) if affine.shear else None) == (pytest.approx(shear, abs=1e-3) if shear else None)
    assert {type(t).__name__ for t in rest} == flips


def test_no_augmentation_option_has_no_random_transform():
    assert build_augment(dict(compose_config("augment=none").augment)) == []


def test_rotation_really_rotates_an_image():
    image = torch.zeros(1, 33, 33, dtype=torch.uint8)
    image[:, 16, :] = 255  # a horizontal bar through the centre
    (rotate,) = build_augment({"rotation": 90})
    torch.manual_seed(0)
    outputs = [rotate(image) for _ in range(20)]
    # a rotated bar leaves the middle row and lights pixels off it
    assert any(o[0, 16, :].float().mean() < 200 and o[0, :16, :].float().sum() > 0 for o in outputs)
    assert all(o[0, 16, 16] > 100 for o in outputs)  # the centre stays on the bar


def test_worker_processes_and_threads_decode_the_same_pixels_and_skip_the_same_files(tmp_path, monkeypatch):
    from cellcls.data import cache
    from cellcls.data.samples import Samples

    files = copy_images(real_dataset("malaria") / "cell_images" / "Parasitized", tmp_path / "imgs", 40)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    samples = Samples([*files[:20], tmp_path / "imgs" / "broken.png", *files[20:]], [0] * 41)
    results = {}
    for mode, threshold in (("threads", 10**9), ("processes", 1)):
        monkeypatch.setattr(cache, "PROCESS_POOL_MIN_IMAGES", threshold)
        out = decode_split(samples, 3, (48, 48), tmp_path / mode, workers=2, progress=False)
        results[mode] = (np.load(out.file)[out.kept], out.kept, [p for p, _ in out.skipped])
    assert np.array_equal(results["threads"][0], results["processes"][0])
    assert results["threads"][1:] == results["processes"][1:] and results["threads"][2] == [str(tmp_path / "imgs" / "broken.png")]


def test_a_truncated_cache_file_is_decoded_again_instead_of_failing(small_set, tmp_path, caplog):
    samples = scan_split(small_set, ["Uninfected", "Parasitized"])
    first = decode_split(samples, 3, (32, 32), tmp_path, progress=False)
    with open(first.file, "r+b") as fh:
        fh.truncate(first.file.stat().st_size // 2)
    again = decode_split(samples, 3, (32, 32), tmp_path, progress=False)
    assert again.decoded == 24 and "is damaged" in caplog.text
    assert np.load(again.file, mmap_mode="r").shape == (24, 3, 32, 32)


def test_half_written_entries_of_stopped_processes_are_removed_and_running_ones_kept(small_set, tmp_path):
    base = tmp_path / "decoded"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = base / f".abc.pid{int(dead.stdout)}.x1"
    running = base / f".def.pid{os.getpid()}.x2"
    for folder in (abandoned, running):
        folder.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"\0" * 1000)
    decode_split(scan_split(small_set, ["Uninfected", "Parasitized"]), 3, (32, 32), tmp_path, progress=False)
    assert not abandoned.exists() and running.exists()


SLOW_DECODE = """
import os, sys, time
from pathlib import Path
from cellcls.data import cache, decode
from cellcls.data.samples import Samples

original = decode.decode_image
def slow(*args, **kwargs):
    time.sleep(0.05)
    return original(*args, **kwargs)
decode.decode_image = slow  # the forked workers inherit it
files = sorted(Path(sys.argv[1]).glob("*.png"))
print("decoding", flush=True)
cache.decode_split(Samples(files * 30, [0] * len(files) * 30), 3, (32, 32), Path(sys.argv[2]), workers=2,
                   progress=False)
"""


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process table from /proc (Linux)")
def test_decode_workers_die_with_a_killed_parent_and_its_entry_is_removed_next_time(small_set, tmp_path):
    import signal
    import time

    parent = subprocess.Popen([sys.executable, "-c", SLOW_DECODE, str(small_set / "Parasitized"), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "decoding"
    deadline = time.monotonic() + 60
    while len(workers := children_of(parent.pid)) < 2:
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    assert list((tmp_path / "decoded").glob(".*.pid*"))  # half written
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
        assert time.monotonic() < deadline, f"decode workers {workers} outlived their parent"
        time.sleep(0.1)
    decode_split(scan_split(small_set, ["Uninfected", "Parasitized"]), 3, (32, 32), tmp_path, progress=False)
    assert not list((tmp_path / "decoded").glob(".*.pid*"))
