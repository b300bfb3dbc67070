"""Every download layout of SEEDS.md is found, from the top of the download or the folder holding the classes."""

from __future__ import annotations

import pytest
from conftest import compose_config, copy_images, real_dataset

from cellcls.data.datamodule import make_splits, resolve_root
from cellcls.data.layouts import scan
from cellcls.errors import DataError

BLOOD = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def layout(dataset: str, root, *overrides: str):
    cfg = compose_config(f"dataset={dataset}", f"dataset.root={root}", *overrides)
    base = resolve_root(cfg.dataset)
    scanned = scan(cfg.dataset, base)
    splits, _ = make_splits(cfg.dataset, scanned.splits, scanned.classes, 0)
    return scanned.classes, scanned.folders, splits, scanned.ignored


@pytest.fixture(scope="module")
def blood(tmp_path_factory):
    src = real_dataset("blood_cells") / "dataset2-master" / "images"
    top = tmp_path_factory.mktemp("blood") / "blood-cells"
    for split, n in (("TRAIN", 8), ("TEST", 3), ("TEST_SIMPLE", 2)):
        for cls in BLOOD:
            copy_images(src / split / cls, top / "dataset2-master" / "images" / split / cls, n)
    return top


@pytest.mark.parametrize("start", ["", "dataset2-master", "dataset2-master/images"])
def test_blood_cells_are_found_from_any_level_of_the_download(blood, start):
    classes, folders, splits, _ = layout("blood_cells", blood / start)
    assert classes == BLOOD
    assert folders["train"].name == "TRAIN" and folders["test"].name == "TEST"
    assert len(splits["test"]) == 12 and len(splits["train"]) + len(splits["val"]) == 32


def test_blood_cells_test_simple_is_chosen_by_setting(blood):
    _, folders, splits, _ = layout("blood_cells", blood, "dataset.test_split=TEST_SIMPLE")
    assert folders["test"].name == "TEST_SIMPLE" and len(splits["test"]) == 8


@pytest.fixture(scope="module")
def malaria_files():
    return real_dataset("malaria") / "cell_images"


@pytest.mark.parametrize("nesting", ["top", "cell_images", "kaggle_nested"])
def test_malaria_is_found_at_the_top_in_cell_images_or_the_nested_kaggle_copy(tmp_path, malaria_files, nesting):
    top = tmp_path / "malaria"
    inner = top / "cell_images" / ("cell_images" if nesting == "kaggle_nested" else "")
    for cls in ("Parasitized", "Uninfected"):
        copy_images(malaria_files / cls, inner / cls, 30)
    (inner / "Parasitized" / "Thumbs.db").write_bytes(b"\0")  # as the Kaggle zip ships it
    root = top / "cell_images" if nesting == "cell_images" else top
    classes, folders, splits, ignored = layout("malaria", root, "dataset.split_by=image")
    assert classes == ["Uninfected", "Parasitized"]
    assert set(folders) == {"train"} and folders["train"] == inner.resolve()
    assert set(splits) == {"train", "val", "test"} and sum(len(s) for s in splits.values()) == 60
    assert [p.name for p in ignored] == ["Thumbs.db"]


def test_macos_resource_folders_are_skipped(tmp_path, malaria_files):
    for cls in ("Parasitized", "Uninfected"):
        copy_images(malaria_files / cls, tmp_path / "cell_images" / cls, 30)
        (tmp_path / "__MACOSX" / cls).mkdir(parents=True)
        (tmp_path / "__MACOSX" / cls / "._junk.png").write_bytes(b"\0\5\26\7")
    _, folders, _, _ = layout("malaria", tmp_path, "dataset.split_by=image")
    assert folders["train"] == (tmp_path / "cell_images").resolve()


@pytest.mark.parametrize("with_validation", [True, False])
def test_skin_cancer_uses_a_validation_folder_when_there_is_one(tmp_path, with_validation):
    src = real_dataset("skin_cancer")
    for split, n in (("train", 12), ("test", 4)) + ((("validation", 5),) if with_validation else ()):
        copy_images(src / ("train" if split == "validation" else split) / "benign", tmp_path / split / "Benign", n)
        copy_images(src / ("train" if split == "validation" else split) / "malignant", tmp_path / split / "MALIGNANT", n)
    classes, folders, splits, _ = layout("skin_cancer", tmp_path)
    assert classes == ["benign", "malignant"]
    if with_validation:
        assert folders["val"].name == "validation" and len(splits["val"]) == 10 and len(splits["train"]) == 24
    else:
        assert "val" not in folders and len(splits["val"]) + len(splits["train"]) == 24


@pytest.mark.parametrize(("normal", "sick"), [("NORMAL", "PNEUMONIA"), ("Normal", "Opacity")])
def test_both_pneumonia_releases_are_accepted(tmp_path, normal, sick):
    src = real_dataset("pneumonia") / "chest_xray"
    for split in ("train", "val", "test"):
        copy_images(src / split / "NORMAL", tmp_path / "chest_xray" / split / normal, 6)
        copy_images(src / split / "PNEUMONIA", tmp_path / "chest_xray" / split / sick, 6)
    (tmp_path / "__MACOSX" / "chest_xray" / "train" / normal).mkdir(parents=True)
    classes, folders, splits, _ = layout("pneumonia", tmp_path)
    assert classes == ["normal", "pneumonia"]
    assert {k: v.name for k, v in folders.items()} == {"train": "train", "val": "val", "test": "test"}
    assert all(sorted(set(s.labels)) == [0, 1] and len(s) == 12 for s in splits.values())


def test_a_root_without_the_layout_shows_what_was_expected_and_what_was_found(tmp_path):
    (tmp_path / "photos" / "misc").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        layout("pneumonia", tmp_path)
    message = str(err.value)
    assert "expected: <root>/[...]/train/{normal, pneumonia|opacity}/<images>" in message
    assert "photos/" in message and "found:" in message


def test_an_empty_class_folder_is_named(tmp_path, malaria_files):
    copy_images(malaria_files / "Parasitized", tmp_path / "cell_images" / "Parasitized", 5)
    (tmp_path / "cell_images" / "Uninfected").mkdir()
    with pytest.raises(DataError, match=r"Uninfected holds no images"):
        layout("malaria", tmp_path)


def test_a_users_own_folder_data_set_discovers_its_classes(tmp_path, malaria_files):
    for cls, name in (("Parasitized", "sick"), ("Uninfected", "healthy")):
        copy_images(malaria_files / cls, tmp_path / "train" / name, 10)
        copy_images(malaria_files / cls, tmp_path / "test" / name, 3, pattern="*_1*")
    classes, folders, splits, _ = layout("folder", tmp_path)
    assert classes == ["healthy", "sick"] and set(folders) == {"train", "test"}
    assert len(splits["test"]) == 6


def test_a_test_class_the_training_folder_lacks_is_refused_by_name(tmp_path, malaria_files):
    for cls, name in (("Parasitized", "sick"), ("Uninfected", "healthy")):
        copy_images(malaria_files / cls, tmp_path / "train" / name, 4)
        copy_images(malaria_files / cls, tmp_path / "test" / name, 2)
    copy_images(malaria_files / "Uninfected", tmp_path / "test" / "unsure", 2)
    with pytest.raises(DataError, match=r"test: folder\(s\) \['unsure'\] hold images of no class the model learns"):
        layout("folder", tmp_path)


def test_a_folder_beside_a_known_data_sets_classes_is_named_in_a_warning(tmp_path, malaria_files, caplog):
    for cls in ("Parasitized", "Uninfected"):
        copy_images(malaria_files / cls, tmp_path / "cell_images" / cls, 10)
    copy_images(malaria_files / "Uninfected", tmp_path / "cell_images" / "Unsure", 4)
    _, _, splits, _ = layout("malaria", tmp_path, "dataset.split_by=image")
    assert "['Unsure'] hold images of no class the model learns" in caplog.text
    assert sum(len(s) for s in splits.values()) == 20


def test_dangling_and_looping_links_are_listed_as_skipped_with_their_reason(tmp_path, malaria_files):
    for cls in ("Parasitized", "Uninfected"):
        copy_images(malaria_files / cls, tmp_path / "cell_images" / cls, 10)
    infected = tmp_path / "cell_images" / "Parasitized"
    (infected / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (infected / "loop.png").symlink_to(infected / "loop.png")
    (infected / "good_link.png").symlink_to(sorted(infected.glob("*.png"))[0])
    cfg = compose_config("dataset=malaria", f"dataset.root={tmp_path}")
    scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
    assert dict(scanned.missing) == {
        str(infected / "gone.png"): f"a symbolic link to {tmp_path / 'nowhere.png'}, which does not exist",
        str(infected / "loop.png"): "a symbolic link that loops back on itself"}
    assert infected / "good_link.png" in scanned.splits["train"].paths


def test_a_layout_of_ones_own_is_used_by_training_and_by_evaluate_alike(tmp_path, monkeypatch):
    import shutil

    import torch
    from conftest import malaria_images

    from cellcls.data import layouts
    from cellcls.data.datamodule import build_data
    from cellcls.data.layouts import Layout, Scanned, scan_location
    from cellcls.data.samples import Samples

    class FlatNames(Layout):
        """One folder of ``<class>__<name>.png`` files: the class in the file name."""

        what = "a flat folder of <class>__<name>.png files"

        def describes(self, ds):
            return ds.name == "flat"

        def holds(self, location):
            return location.is_dir() and any("__" in p.name for p in location.glob("*.png"))

        def _samples(self, folder, classes):
            files = sorted(folder.glob("*__*.png"))
            return Samples(files, [classes.index(p.name.split("__")[0]) for p in files])

        def scan(self, ds, root):
            return Scanned(["Parasitized", "Uninfected"], {"train": self._samples(root, ["Parasitized", "Uninfected"])})

        def scan_location(self, ds, location, classes):
            return Scanned(list(classes), {"data": self._samples(location, list(classes))}, root=location)

    monkeypatch.setattr(layouts, "LAYOUTS", list(layouts.LAYOUTS))
    layouts.register_layout(FlatNames())
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in malaria_images(20):
        shutil.copy2(path, flat / f"{path.parent.name}__{path.name}")
    cfg = compose_config("dataset=folder", "dataset.name=flat", f"dataset.root={flat}", "dataset.image_size=[32,32]",
                         "dataset.val_fraction=0.2")
    data = build_data(cfg.dataset, None, 0, torch.device("cpu"), "loader")
    assert data.classes == ["Parasitized", "Uninfected"]
    assert len(data.splits["train"]) + len(data.splits["val"]) == 20
    found = scan_location(cfg.dataset, flat, ["Parasitized", "Uninfected"])
    assert sorted(found.splits["data"].labels) == [0] * 10 + [1] * 10
