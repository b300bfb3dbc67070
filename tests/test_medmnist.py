"""``dataset=medmnist dataset.file=<archive>.npz``: MedMNIST v2 archives (written here in the same format, from real
cells of the shared subsets) train and evaluate with their official splits and class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellcls.data.medmnist import ensure_medmnist, read_archive
from cellcls.errors import DataError
from conftest import compose_config, malaria_images, train_in_process


def write_archive(path, per_split=(("train", 40), ("val", 10), ("test", 16)), size=28, **replace):
    """A MedMNIST-format archive of real malaria cells at ``size`` px: labels 0 Uninfected, 1 Parasitized."""
    files = iter(malaria_images(sum(n for _, n in per_split)))
    arrays = {}
    for split, n in per_split:
        chosen = [next(files) for _ in range(n)]
        arrays[f"{split}_images"] = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)))
                                              for f in chosen])
        arrays[f"{split}_labels"] = np.array([[int(f.parent.name == "Parasitized")] for f in chosen], np.uint8)
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_an_archive_trains_on_its_official_splits_and_evaluates_the_same(tmp_path):
    from cellcls.evaluation.evaluate import evaluate

    archive = write_archive(tmp_path / "cells_28.npz")
    run = tmp_path / "run"
    train_in_process(run, "dataset=medmnist", f"dataset.file={archive}", "dataset.classes=[Uninfected,Parasitized]",
                     "model=lenet", "trainer.max_epochs=2", "trainer.progress_bar=false")
    rows = {s: (run / "splits" / f"{s}.csv").read_text().splitlines()[1:] for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 40, "val": 10, "test": 16}  # no hold-out of its own
    labels = np.load(archive)["test_labels"].reshape(-1)
    assert [r.split(",")[1] for r in rows["test"]] == [["Uninfected", "Parasitized"][v] for v in labels]
    test = json.loads((run / "test_metrics.json").read_text())
    result, _ = evaluate(run, make_plots=False, output=tmp_path / "eval")
    assert result["num_images"] == 16 and result["accuracy"]["value"] == pytest.approx(test["accuracy"])


def test_a_known_set_gets_its_medmnist_class_names():
    from cellcls.data.medmnist import class_names

    assert class_names(Path("bloodmnist_224.npz"), {"train": [0, 7]}, None)[7] == "platelet"
    assert class_names(Path("mine.npz"), {"train": [0, 2]}, None) == ["class_0", "class_1", "class_2"]


def test_the_png_copy_is_written_once(tmp_path):
    archive = write_archive(tmp_path / "cells_28.npz", per_split=(("train", 4), ("val", 2), ("test", 2)))
    root = ensure_medmnist(archive, tmp_path / "cache")
    stamp = (root / "labels.json").stat().st_mtime_ns
    assert ensure_medmnist(archive, tmp_path / "cache") == root and (root / "labels.json").stat().st_mtime_ns == stamp
    assert Image.open(root / "train" / "000000.png").size == (28, 28)


def test_an_archive_without_the_expected_arrays_names_what_is_missing(tmp_path):
    archive = write_archive(tmp_path / "bad.npz", per_split=(("train", 4), ("test", 2)))
    with pytest.raises(DataError, match=r"bad.npz: a MedMNIST archive holds train_images, .*lacks val_images, "
                                        r"val_labels \(it holds"):
        read_archive(archive)


def test_a_multi_label_archive_is_refused(tmp_path):
    archive = write_archive(tmp_path / "chestmnist_28.npz", per_split=(("train", 4), ("val", 2), ("test", 2)),
                            train_labels=np.zeros((4, 14), np.uint8))
    with pytest.raises(DataError, match="train_labels has 14 labels per image .*multi-label"):
        read_archive(archive)


def test_labels_beyond_the_named_classes_are_refused(tmp_path):
    archive = write_archive(tmp_path / "cells_28.npz", per_split=(("train", 4), ("val", 2), ("test", 2)))
    cfg = compose_config("dataset=medmnist", f"dataset.file={archive}", "dataset.classes=[only_one]")
    from cellcls.data.datamodule import resolve_root
    from cellcls.data.layouts import scan

    with pytest.raises(DataError, match="labels go up to 1 but the classes are 1 \\(only_one\\)"):
        scan(cfg.dataset, resolve_root(cfg.dataset))


def test_a_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="dataset.file=.*nothing.npz: no such file"):
        ensure_medmnist(tmp_path / "nothing.npz")
