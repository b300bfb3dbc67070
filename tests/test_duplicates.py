"""The near-duplicate audit, splits by duplicate cluster and the leakage warnings, on real images."""

from __future__ import annotations

import csv
import json
import logging

import cv2
import numpy as np
import pytest
from conftest import SHARED_DATA, compose_config, copy_images, real_dataset, run_cli
from PIL import Image, ImageOps

from cellcls.config.schema import DatasetConfig, typed
from cellcls.config.schema import DuplicatesConfig
from cellcls.data.datamodule import make_splits, resolve_root
from cellcls.data.layouts import scan
from cellcls.data.duplicates import MIRROR, find_duplicates, fingerprint
from cellcls.data.samples import Samples
from cellcls.data.leakage import duplicate_clusters, find_leaks
from cellcls.data.splits import attach_groups
from cellcls.data.splits import group_ids
from cellcls.errors import DataError

BLOOD = "dataset2-master/images"


def manifest_groups() -> dict:
    """file (resolved) -> original photo or patient, from the shared subsets' MANIFEST.csv."""
    with open(SHARED_DATA / "MANIFEST.csv", newline="") as fh:
        return {(SHARED_DATA / r["file"]).resolve(): r["group"] for r in csv.DictReader(fh)}


def originals(n: int) -> list:
    """``n`` real blood-cell TEST images, each from a different original smear photo."""
    real_dataset("blood_cells")
    truth, picked, seen = manifest_groups(), [], set()
    for path in sorted((SHARED_DATA / "blood_cells" / BLOOD / "TEST").rglob("*.jpeg")):
        if truth[path.resolve()] not in seen:
            seen.add(truth[path.resolve()])
            picked.append(path)
        if len(picked) == n:
            return picked
    raise AssertionError("not enough distinct photos")


def transformed_copies(image: Image.Image) -> dict[str, Image.Image]:
    w, h = image.size
    return {
        "flipped": ImageOps.mirror(image),
        "turned 90 degrees": image.rotate(90, expand=True),
        "rotated 7 degrees": image.rotate(7),
        "shifted": image.transform(image.size, Image.Transform.AFFINE, (1, 0, w * 0.1, 0, 1, h * 0.08)),
        "cropped": image.crop((w // 10, h // 10, w, h)),
        "half size": image.resize((w // 2, h // 2)),
    }


def test_a_mirrored_descriptor_is_a_permutation_of_the_original(tmp_path):
    grey = np.asarray(Image.open(originals(1)[0]).convert("L"))
    sift = cv2.SIFT_create(nfeatures=100)
    keypoints, descriptors = sift.detectAndCompute(grey, None)
    width = grey.shape[1]
    mirrored_points = [cv2.KeyPoint(width - 1 - k.pt[0], k.pt[1], k.size, (180 - k.angle) % 360, k.response, k.octave)
                       for k in keypoints]
    _, expected = sift.compute(np.ascontiguousarray(grey[:, ::-1]), mirrored_points)
    error = np.abs(descriptors[:, MIRROR] - expected).mean() / np.abs(expected).mean()
    unpermuted = np.abs(descriptors - expected).mean() / np.abs(expected).mean()
    assert error < 0.15 < unpermuted


def test_flipped_rotated_shifted_cropped_resized_and_reencoded_copies_join_their_original(tmp_path):
    files = []
    for k, source in enumerate(originals(4)):
        image = Image.open(source).convert("RGB")
        files.append(tmp_path / f"original_{k}.png")
        image.save(files[-1])
        for name, copy in transformed_copies(image).items():
            files.append(tmp_path / f"{k}_{name.replace(' ', '_')}.png")
            copy.save(files[-1])
        files.append(tmp_path / f"{k}_reencoded.jpg")
        image.save(files[-1], quality=60)
    found = find_duplicates(files, progress=False)
    per_original = len(files) // 4
    for k in range(4):
        cluster = found.cluster[k * per_original:(k + 1) * per_original]
        assert len(set(cluster)) == 1, [f.name for f, c in zip(files[k * per_original:], cluster) if c != cluster[0]]
    assert len(set(found.cluster)) == 4  # four different photos stay apart


def test_a_pixel_identical_copy_under_another_name_is_an_exact_duplicate(tmp_path):
    a, b, other = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    first, second = originals(2)
    Image.open(first).save(a)
    Image.open(first).save(b)
    Image.open(second).save(other)
    found = find_duplicates([a, b, other], progress=False)
    assert (0, 1, -1) in found.pairs
    assert found.cluster[0] == found.cluster[1] != found.cluster[2]


def test_an_unreadable_file_is_reported_and_the_rest_are_still_audited(tmp_path):
    good = copy_images(SHARED_DATA / "blood_cells" / BLOOD / "TEST" / "MONOCYTE", tmp_path, 2, "*.jpeg")
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"not an image")
    found = find_duplicates([*good, bad], progress=False)
    assert list(found.unreadable) == [2] and "broken.jpeg" in found.unreadable[2]


def test_different_patients_cells_and_xrays_are_not_called_duplicates():
    """Cells and chest X-rays of different patients look alike; none of them is a copy of another."""
    truth = manifest_groups()
    for folder in ("malaria/cell_images/Parasitized", "pneumonia/chest_xray/train/NORMAL"):
        real_dataset(folder.split("/")[0])
        files = sorted((SHARED_DATA / folder).glob("*"))[:120]
        found = find_duplicates(files, progress=False)
        assert all(truth[files[i].resolve()] == truth[files[j].resolve()] for i, j, _ in found.pairs), folder


@pytest.fixture(scope="module")
def blood_splits(cache_root):
    """The blood-cell subset split the default way (by near-duplicate cluster), and its clusters."""
    root = real_dataset("blood_cells")
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test, not yet active here
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        cfg = compose_config("dataset=blood_cells", f"dataset.root={root}")
        scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
        splits, leaks = make_splits(cfg.dataset, scanned.splits, scanned.classes, int(cfg.seed), progress=False)
        return splits, leaks, duplicate_clusters(splits, typed(cfg.dataset, DatasetConfig), progress=False)


def test_the_clusters_recover_the_blood_cells_original_photos(blood_splits):
    from sklearn.metrics.cluster import pair_confusion_matrix

    _, _, clusters = blood_splits
    truth = manifest_groups()
    files = sorted(clusters)
    (_, false_join), (false_split, together) = pair_confusion_matrix(
        [truth[f.resolve()] for f in files], [clusters[f] for f in files])
    precision, recall = together / (together + false_join), together / (together + false_split)
    assert precision > 0.98 and recall > 0.98, (precision, recall)


def test_split_by_duplicates_keeps_almost_every_photos_copies_on_one_side(blood_splits):
    splits, _, _ = blood_splits
    truth = manifest_groups()
    train = {truth[p.resolve()] for p in splits["train"].paths}
    shared = sum(truth[p.resolve()] in train for p in splits["val"].paths)
    assert shared / len(splits["val"]) < 0.05  # an image-level split shares 97% (issue 14)


def test_the_blood_cell_default_split_reports_what_test_shares_with_train(blood_splits):
    splits, leaks, clusters = blood_splits
    train = {clusters[p] for p in splits["train"].paths}
    expected = sum(clusters[p] in train for p in splits["test"].paths)
    reported = {(leak.split, leak.kind): leak.images for leak in leaks}
    assert reported.get(("test", "near-duplicate"), 0) == expected
    assert ("val", "near-duplicate") not in reported  # split by cluster: nothing shared


def test_a_run_warns_at_start_when_validation_holds_a_copy_of_a_training_image(tmp_path, caplog):
    from cellcls.data.datamodule import build_data

    src = SHARED_DATA / "blood_cells" / BLOOD
    real_dataset("blood_cells")
    for split, folder in (("train", "TRAIN"), ("val", "TEST")):
        for cls in ("EOSINOPHIL", "NEUTROPHIL"):
            copy_images(src / folder / cls, tmp_path / split / cls, 6, "*.jpeg")
    leaked = sorted((tmp_path / "train" / "NEUTROPHIL").iterdir())[0]
    ImageOps.mirror(Image.open(leaked)).save(tmp_path / "val" / "NEUTROPHIL" / "mirrored_copy.jpeg")
    cfg = compose_config("dataset=folder", f"dataset.root={tmp_path}", "dataset.leakage_check=duplicates",
                         "dataset.image_size=[32,32]")
    with caplog.at_level(logging.WARNING):
        build_data(cfg.dataset, None, 0, __import__("torch").device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if "split leakage" in r.getMessage()]
    assert len(warnings) == 1 and "1 of 13 val images" in warnings[0] and "near-duplicate" in warnings[0]


def test_a_patient_on_both_sides_of_given_split_folders_is_reported(tmp_path):
    src = real_dataset("malaria") / "cell_images"
    infected = sorted((src / "Parasitized").glob("*.png"))
    copy_images(src / "Parasitized", tmp_path / "train" / "Parasitized", 10, "*.png")
    copy_images(src / "Uninfected", tmp_path / "train" / "Uninfected", 10, "*.png")
    copy_images(src / "Uninfected", tmp_path / "val" / "Uninfected", 3, "*.png")  # the same files: same patients
    (tmp_path / "val" / "Parasitized").mkdir()
    Image.open(infected[0]).save(tmp_path / "val" / "Parasitized" / infected[0].name)
    cfg = compose_config("dataset=folder", f"dataset.root={tmp_path}", "dataset.group_pattern='^(C\\d+)'")
    scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
    _, leaks = make_splits(cfg.dataset, scanned.splits, scanned.classes, 0)
    assert [(leak.split, leak.kind, leak.images, leak.total) for leak in leaks] == [("val", "patient", 4, 4)]


def test_a_group_pattern_that_matches_no_file_name_is_a_clear_error(tmp_path):
    files = [tmp_path / "cell_1.png", tmp_path / "cell_2.png"]
    with pytest.raises(DataError, match=r"group_pattern .* matches none of the 2 file names \(e\.g\. 'cell_1\.png'\)"):
        group_ids(Samples(files, [0, 1]), r"^(P\d+)")


def test_split_leaks_count_images_and_groups():
    files = [__import__("pathlib").Path(f"C{k}_x.png") for k in (1, 1, 2, 3, 1, 3)]
    splits = {"train": Samples(files[:3], [0, 1, 0]), "val": Samples(files[3:], [0, 1, 1])}
    cfg = compose_config("dataset=folder", "dataset.root=/nowhere", "dataset.group_pattern='^(C\\d+)'")
    ds = typed(cfg.dataset, DatasetConfig)
    splits = {name: attach_groups(samples, ds) for name, samples in splits.items()}
    [leak] = find_leaks(splits, ds, None)
    assert (leak.images, leak.total, leak.groups) == (1, 3, 1)


def test_the_audit_command_writes_clusters_counts_and_a_grid(tmp_path):
    src = SHARED_DATA / "blood_cells" / BLOOD
    real_dataset("blood_cells")
    for split, folder in (("train", "TRAIN"), ("test", "TEST")):
        for cls in ("EOSINOPHIL", "MONOCYTE"):
            copy_images(src / folder / cls, tmp_path / "data" / split / cls, 5, "*.jpeg")
    copied = sorted((tmp_path / "data" / "train" / "MONOCYTE").iterdir())[0]
    Image.open(copied).rotate(90, expand=True).save(tmp_path / "data" / "test" / "MONOCYTE" / "turned.png")
    result = run_cli("cellcls.audit", "dataset=folder", f"dataset.root={tmp_path / 'data'}", "dataset.val_fraction=0.2",
                     "output=audit", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "audit"
    summary = json.loads((out / "summary.json").read_text())
    pair = next(r for r in summary["split_pairs"] if r["splits"] == "train-test")
    assert pair["images_test"] >= 1 and pair["clusters"] >= 1
    with open(out / "duplicates.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    turned = next(r for r in rows if r["file"].endswith("turned.png"))
    partners = [r for r in rows if r["cluster"] == turned["cluster"] and r is not turned]
    assert any(r["file"].endswith(copied.name) for r in partners)
    with Image.open(out / "largest_clusters.png") as im:
        assert im.format == "PNG" and im.width > 200
    assert "train & test" in result.stdout and "written to" in result.stdout


def test_the_audit_of_a_run_folder_covers_exactly_its_split_lists(one_epoch_run, tmp_path):
    result = run_cli("cellcls.audit", f"run={one_epoch_run}", f"output={tmp_path / 'audit'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    listed = {s: len((one_epoch_run / "splits" / f"{s}.csv").read_text().splitlines()) - 1
              for s in ("train", "val", "test")}
    assert summary["images_per_split"] == listed


def test_fingerprints_use_the_settings(tmp_path):
    image = originals(1)[0]
    few = fingerprint(image, DuplicatesConfig(keypoints=20))
    many = fingerprint(image, DuplicatesConfig(keypoints=200))
    assert len(few.descriptors) <= 20 < len(many.descriptors)


def test_intervals_on_blood_cells_resample_duplicate_clusters(blood_splits, cache_root):
    from cellcls.data.leakage import interval_groups

    splits, _, clusters = blood_splits
    cfg = compose_config("dataset=blood_cells", f"dataset.root={real_dataset('blood_cells')}")
    groups = interval_groups(cfg.dataset, splits["test"], splits)
    assert groups == [clusters[p] for p in splits["test"].paths]
    assert 10 < len(set(groups)) < len(groups) / 3  # dozens of photos behind 320 images
