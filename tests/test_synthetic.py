"""The embedded synthetic data set: real PNG files in class folders, seeded, cached, learnable."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
from PIL import Image

from cellcls.data.synthetic import CLASSES, SyntheticSpec, ensure_synthetic

SMALL = SyntheticSpec(train_per_class=6, test_per_class=3, size=48, seed=1)


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_renders_a_download_like_layout_of_png_class_folders(tmp_path):
    root = ensure_synthetic(SMALL, base=tmp_path)
    for split, n in (("train", 6), ("test", 3)):
        for name in CLASSES:
            files = sorted((root / split / name).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (48, 48)


def test_rendering_is_seeded_and_identical_across_cache_folders(tmp_path):
    a = ensure_synthetic(SMALL, base=tmp_path / "a")
    b = ensure_synthetic(SMALL, base=tmp_path / "b")
    assert digest(a) == digest(b)


def test_second_use_reads_the_cache_without_rendering_again(tmp_path):
    root = ensure_synthetic(SMALL, base=tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    assert ensure_synthetic(SMALL, base=tmp_path) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == stamp


def test_changed_settings_render_a_new_data_set(tmp_path):
    root = ensure_synthetic(SMALL, base=tmp_path)
    other = ensure_synthetic(SyntheticSpec(train_per_class=6, test_per_class=3, size=48, seed=2), base=tmp_path)
    assert other != root
    assert digest(other) != digest(root)


def test_annotations_place_each_parasite_inside_its_image_and_only_in_parasitized_cells(tmp_path):
    root = ensure_synthetic(SMALL, base=tmp_path)
    with open(root / "annotations.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * (6 + 3)
    for row in rows:
        if row["class"] == "parasitized":
            x, y, r = float(row["parasite_x"]), float(row["parasite_y"]), float(row["parasite_radius"])
            assert 0 < x < 48 and 0 < y < 48 and 1 < r < 10
        else:
            assert row["parasite_x"] == ""


def test_the_parasite_is_visible_as_dark_stain_at_its_annotated_position(tmp_path):
    root = ensure_synthetic(SMALL, base=tmp_path)
    with open(root / "annotations.csv") as fh:
        infected = [r for r in csv.DictReader(fh) if r["class"] == "parasitized"]
    for row in infected:
        img = np.asarray(Image.open(root / row["file"]).convert("L"), dtype=float)
        x, y, r = (float(row[k]) for k in ("parasite_x", "parasite_y", "parasite_radius"))
        yy, xx = np.mgrid[0:48, 0:48]
        ring = np.abs(np.hypot(xx - x, yy - y) - r) < 1.0
        assert img[ring].mean() < img.mean() - 15
