"""Scanning class folders, splitting, decoding and augmenting real image files."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import real_dataset, run_cli
from PIL import Image

from cellcls.data.dataset import load_image
from cellcls.data.layouts.folders import discover_classes, scan_split
from cellcls.data.splits import stratified_holdout
from cellcls.data.transforms import build_augment, build_transform
from cellcls.errors import ConfigError, DataError


def write_images(folder, n, size=(20, 16), colour=(200, 50, 50), mode="RGB", ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, size, colour).save(folder / f"img_{i:03d}.{ext}")


def test_class_folders_are_matched_case_insensitively(tmp_path):
    write_images(tmp_path / "NORMAL", 2)
    write_images(tmp_path / "Pneumonia", 3, ext="jpeg")
    samples = scan_split(tmp_path, ["normal", "PNEUMONIA"])
    assert Counter(samples.labels) == {0: 2, 1: 3}


def test_class_folders_that_differ_only_in_case_are_refused_naming_both(tmp_path):
    write_images(tmp_path / "Parasitized", 2)
    write_images(tmp_path / "Uninfected", 2)
    write_images(tmp_path / "uninfected", 2)
    with pytest.raises(DataError, match=r"'Uninfected' and 'uninfected' differ only in letter case"):
        scan_split(tmp_path, ["parasitized", "uninfected"])
    with pytest.raises(DataError, match=r"'Uninfected' and 'uninfected'"):
        discover_classes(tmp_path)  # a user's own folder data set would have had three classes


def test_a_case_twin_class_folder_stops_training_before_it_starts(tmp_path):
    for name in ("Parasitized", "Uninfected", "uninfected"):
        write_images(tmp_path / "data" / "cell_images" / name, 6)
    result = run_cli("cellcls.train", "dataset=malaria", f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "'Uninfected' and 'uninfected' differ only in letter case" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_class_folder_names_the_expected_and_found_folders(tmp_path):
    write_images(tmp_path / "benign", 1)
    with pytest.raises(DataError, match=r"malignant.*found \['benign'\]"):
        scan_split(tmp_path, ["benign", "malignant"])


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_images(tmp_path / "a", 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"b holds no images"):
        scan_split(tmp_path, ["a", "b"])


def test_non_image_files_are_ignored_and_counted(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "Thumbs.db").write_bytes(b"\0")
    samples = scan_split(tmp_path, ["a", "b"])
    assert len(samples) == 4 and sorted(p.name for p in samples.ignored) == ["Thumbs.db", "notes.txt"]


def test_holdout_split_is_stratified_seeded_and_disjoint(tmp_path):
    write_images(tmp_path / "a", 60)
    write_images(tmp_path / "b", 20)
    samples = scan_split(tmp_path, ["a", "b"])
    kept, held = stratified_holdout(samples, 0.25, seed=7)
    assert Counter(held.labels) == {0: 15, 1: 5}
    assert not set(kept.paths) & set(held.paths) and len(kept) + len(held) == 80
    assert stratified_holdout(samples, 0.25, seed=7)[1].paths == held.paths
    assert stratified_holdout(samples, 0.25, seed=8)[1].paths != held.paths


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "I;16"])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_pillow_mode_decodes_to_the_requested_channels_and_size(tmp_path, mode, channels):
    path = tmp_path / f"img.{'tif' if mode == 'CMYK' else 'png'}"
    image = Image.new(mode, (40, 30))
    if mode == "I;16":  # a 16-bit greyscale PNG, as many X-ray exports are
        image = Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16))
        assert image.mode.startswith("I;16")
    image.save(path)
    tensor = load_image(path, channels, (24, 32))
    assert tensor.dtype == torch.uint8 and tensor.shape == (channels, 24, 32)
    if mode == "I;16":  # 16-bit X-rays are rescaled, not clipped to white
        assert tensor.min() < 10 and tensor.max() > 245


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_16_bit_xray_keeps_its_contrast_in_8_bits(tmp_path, suffix):
    xray = sorted((real_dataset("pneumonia") / "chest_xray" / "test" / "NORMAL").glob("*.jpeg"))[0]
    grey = np.asarray(Image.open(xray).convert("L"))
    path = tmp_path / f"xray{suffix}"
    Image.fromarray(grey.astype(np.uint16) * 257).save(path)  # the full 16-bit range, as detector exports are
    assert Image.open(path).mode.startswith("I;16")
    out = load_image(path, 1, grey.shape)[0].numpy().astype(int)
    assert np.abs(out - grey).max() <= 1  # not clipped to white, not flattened


def test_exif_orientation_is_honoured(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white as stored
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    tensor = load_image(tmp_path / "rot.jpg", 3, (40, 20))  # displayed upright: 40 tall, 20 wide
    top, bottom = tensor[:, :20].float().mean(), tensor[:, 20:].float().mean()
    assert top > 200 and bottom < 50


def test_a_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad, 3, (16, 16))


def test_horizontal_flip_augmentation_mirrors_the_image():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, :, :2] = 255
    flipped = [build_transform({"hflip": True})(image) for _ in range(40)]
    mirrored = torch.flip(image, dims=[2]).float() / 255
    assert any(torch.equal(f, mirrored) for f in flipped)
    assert any(torch.equal(f, image.float() / 255) for f in flipped)


def test_shear_is_given_in_radians_as_keras_does():
    (affine,) = build_augment({"shear": 0.2})
    assert affine.shear == pytest.approx([-11.459, 11.459], abs=1e-3)  # x-shear, as Keras


def test_no_augmentation_only_rescales_to_unit_range():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(build_transform(None)(image), image.float() / 255)


def test_unknown_augmentation_setting_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="rotation"):
        build_augment({"rotate": 10})


def test_predict_reads_the_files_training_reads_leaving_hidden_ones_out(tmp_path):
    from cellcls.deploy.predict import list_inputs

    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 1)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "._img_000.png")  # macOS's resource fork beside a copied image
    write_images(tmp_path / "a" / ".ipynb_checkpoints", 1)
    write_images(tmp_path / "__MACOSX" / "a", 1)
    seen = list_inputs(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in seen] == ["a/img_000.png", "a/img_001.png", "b/img_000.png"]
    assert sorted(scan_split(tmp_path, ["a", "b"]).paths) == seen
