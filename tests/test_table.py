"""dataset=csv (issue 17, part 1): an ISIC-style metadata table over a flat folder of real skin-lesion images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY, compose_config, real_dataset, train_in_process

from cellcls.data.datamodule import build_data, make_splits, resolve_root
from cellcls.data.layouts import scan
from cellcls.errors import DataError

DIAGNOSES = {"benign": ["nevus", "seborrheic_keratosis"], "malignant": ["melanoma"]}
LABEL_MAP = "dataset.table.label_map={melanoma: malignant, nevus: benign, seborrheic_keratosis: benign}"


def make_isic(folder: Path, per_class: int = 24, split: bool = False) -> Path:
    """``folder/images/<image_id>.jpg`` (real skin-lesion photos) and ``folder/metadata.csv`` as ISIC ships it:
    image_id (no extension), diagnosis, lesion_id (two photos per lesion) and, with ``split``, a split column."""
    skin = real_dataset("skin_cancer") / "train"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for cls, diagnoses in DIAGNOSES.items():
        for i, src in enumerate(sorted((skin / cls).glob("*.jpg"))[:per_class]):
            shutil.copy2(src, folder / "images" / src.name)
            lesion = f"IL_{cls}_{i // 2:03d}"
            row = {"image_id": src.stem, "diagnosis": diagnoses[i % len(diagnoses)], "lesion_id": lesion}
            if split:  # whole lesions per split: 4 of every 6 lesions train, 1 validation, 1 test
                row["split"] = ["TRAIN", "TRAIN", "TRAIN", "TRAIN", "Validation", "test"][(i // 2) % 6]
            rows.append(row)
    write_table(folder / "metadata.csv", rows)
    return folder / "metadata.csv"


def write_table(file: Path, rows: list[dict]) -> Path:
    with file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return file


def read_table(file: Path) -> list[dict]:
    with file.open(newline="") as fh:
        return list(csv.DictReader(fh))


def isic_config(folder: Path, *overrides: str):
    return compose_config("dataset=csv", f"dataset.root={folder}", "dataset.table.file=metadata.csv",
                          "dataset.table.path_template='images/{image_id}.jpg'", "dataset.table.label=diagnosis",
                          LABEL_MAP, *overrides)


def splits_of(cfg):
    scanned = scan(cfg.dataset, resolve_root(cfg.dataset))
    return scanned, make_splits(cfg.dataset, scanned.splits, scanned.classes, int(cfg.seed))[0]


def test_an_isic_table_maps_diagnoses_to_classes_and_keeps_each_lesion_on_one_side(tmp_path):
    make_isic(tmp_path)
    cfg = isic_config(tmp_path, "dataset.table.group=lesion_id", "dataset.split_by=patient",
                      "dataset.test_fraction=0.25", "dataset.val_fraction=0.25")
    scanned, splits = splits_of(cfg)
    assert scanned.classes == ["benign", "malignant"]
    assert sum(len(s) for s in splits.values()) == 48
    lesions = {name: set(s.groups) for name, s in splits.items()}
    assert not lesions["train"] & lesions["val"] and not lesions["train"] & lesions["test"]
    for samples in splits.values():  # melanoma photos are malignant, nevi and keratoses benign
        for path, label in zip(samples.paths, samples.labels, strict=True):
            assert label == (1 if path.stem in {r["image_id"] for r in read_table(tmp_path / "metadata.csv")
                                                if r["diagnosis"] == "melanoma"} else 0)


def test_the_split_column_puts_each_row_in_its_split_whatever_its_case(tmp_path):
    make_isic(tmp_path, split=True)
    _, splits = splits_of(isic_config(tmp_path, "dataset.table.split=split"))
    rows = {r["image_id"]: r["split"].lower() for r in read_table(tmp_path / "metadata.csv")}
    for name, samples in splits.items():
        assert {rows[p.stem] for p in samples.paths} == {"validation" if name == "val" else name}


def test_a_label_mapped_to_null_drops_its_rows(tmp_path):
    make_isic(tmp_path)
    cfg = isic_config(tmp_path, "dataset.table.label_map.seborrheic_keratosis=null")
    scanned, _ = splits_of(cfg)
    kept = {p.stem for s in scanned.splits.values() for p in s.paths}
    dropped = {r["image_id"] for r in read_table(tmp_path / "metadata.csv") if r["diagnosis"] == "seborrheic_keratosis"}
    assert dropped and not kept & dropped and len(kept) == 48 - len(dropped)


def bad(rows: list[dict], kind: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    if kind == "unknown label":
        rows[3]["diagnosis"] = "basal_cell_carcinoma"
    elif kind == "duplicate row":
        rows[3] = dict(rows[1])
    elif kind == "escaping path":
        rows[3]["image_id"] = "../../etc/passwd"
    elif kind == "empty label":
        rows[3]["diagnosis"] = ""
    return rows


@pytest.mark.parametrize(("kind", "message"), [
    ("unknown label", "line 5: label 'basal_cell_carcinoma' is not a class (benign, malignant); map it with "
                      "dataset.table.label_map"),
    ("duplicate row", "line 5: repeats the image of line 3"),
    ("escaping path", "line 5: path 'images/../../etc/passwd.jpg' is outside the images root"),
    ("empty label", "line 5: empty label"),
])
def test_a_bad_row_is_refused_with_its_line_and_what_is_wrong(tmp_path, kind, message):
    table = make_isic(tmp_path, per_class=4)
    write_table(table, bad(read_table(table), kind))
    with pytest.raises(DataError, match="1 row\\(s\\) cannot be used") as err:
        splits_of(isic_config(tmp_path))
    assert message in str(err.value) and str(table) in str(err.value)


def test_an_unclosed_quote_is_named_by_the_line_that_opens_it(tmp_path):
    table = make_isic(tmp_path, per_class=4)
    lines = table.read_text().splitlines()
    lines[4] = lines[4].replace(",", ',"', 1)  # line 5 opens a quote that nothing closes
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r'line 5: a quote \(\"\) opened on this line is not closed until line 9'):
        splits_of(isic_config(tmp_path))


def test_every_bad_row_is_listed_in_one_error(tmp_path):
    table = make_isic(tmp_path, per_class=4)
    rows = read_table(table)
    rows[2]["diagnosis"], rows[5]["diagnosis"] = "unknown", "other"
    write_table(table, rows)
    with pytest.raises(DataError, match="2 row\\(s\\) cannot be used") as err:
        splits_of(isic_config(tmp_path))
    assert "line 4:" in str(err.value) and "line 7:" in str(err.value)


def test_a_row_whose_file_is_missing_is_skipped_and_listed_with_its_line(tmp_path):
    table = make_isic(tmp_path, per_class=8)
    rows = read_table(table)
    (tmp_path / "images" / f"{rows[2]['image_id']}.jpg").unlink()
    cfg = isic_config(tmp_path, "dataset.image_size=[32,32]", "dataset.val_fraction=0.25")
    bundle = build_data(cfg.dataset, None, 0, __import__("torch").device("cpu"))
    assert sum(len(s) for s in bundle.splits.values()) == 15
    assert [(Path(p).name, why) for p, why in bundle.skipped] == [(f"{rows[2]['image_id']}.jpg",
                                                                  "metadata.csv line 4: no such file")]


def test_a_missing_column_is_named_with_the_nearest_one(tmp_path):
    make_isic(tmp_path, per_class=4)
    with pytest.raises(DataError, match="no column 'lesion' \\(dataset.table.group\\); did you mean 'lesion_id'"):
        splits_of(isic_config(tmp_path, "dataset.table.group=lesion"))


def test_a_parquet_table_lists_the_same_images_as_the_csv(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet tables are the optional extra cellcls[parquet]")
    import pyarrow as pa

    table = make_isic(tmp_path, per_class=6)
    pq.write_table(pa.Table.from_pylist(read_table(table)), tmp_path / "metadata.parquet")
    from_csv, _ = splits_of(isic_config(tmp_path, "dataset.table.group=lesion_id"))
    from_parquet, _ = splits_of(isic_config(tmp_path, "dataset.table.file=metadata.parquet",
                                            "dataset.table.group=lesion_id"))
    assert from_parquet.splits["train"] == from_csv.splits["train"]


def test_a_table_trained_model_is_inspected_evaluated_predicted_and_audited_from_tables(tmp_path, capsys):
    from cellcls import audit, predict
    from cellcls.data import inspect
    from cellcls.evaluation.evaluate import evaluate

    data = tmp_path / "isic"
    make_isic(data, per_class=16)
    args = ["dataset=csv", f"dataset.root={data}", "dataset.table.file=metadata.csv",
            "dataset.table.path_template='images/{image_id}.jpg'", "dataset.table.label=diagnosis", LABEL_MAP,
            "dataset.table.group=lesion_id", "dataset.split_by=patient", "dataset.test_fraction=0.25",
            "dataset.val_fraction=0.25", "model=lenet", "trainer.max_epochs=1", "logger=csv",
            *[o for o in TINY if not o.startswith("dataset.render")]]
    assert inspect.main(args) == 0
    report = capsys.readouterr().out
    assert "patients/groups per split (dataset.table.group=lesion_id)" in report and "0 also in train" in report

    run = tmp_path / "run"
    train_in_process(run, *args)
    external = tmp_path / "external"
    make_isic(external, per_class=5)  # a table with paths relative to its own folder, scored per lesion
    metrics, out = evaluate(run, data=external / "metadata.csv", overrides=["dataset.table.group=lesion_id"],
                            group_by="patient", make_plots=False, n_boot=50)
    assert metrics["num_images"] == 10 and metrics["per_patient"]["num_images"] == 6  # 3 lesions per class
    assert len(read_table(out / "predictions.csv")) == 10

    assert predict.main([f"checkpoint={run}", f"input={external / 'metadata.csv'}",
                         "path_template=images/{image_id}.jpg", f"output={tmp_path / 'p.csv'}"]) == 0
    assert [Path(r["file"]).stem for r in read_table(tmp_path / "p.csv")] == \
        [r["image_id"] for r in read_table(external / "metadata.csv")]

    assert audit.main([*args[:8], f"output={tmp_path / 'audit'}"]) == 0
    summary = json.loads((tmp_path / "audit" / "summary.json").read_text())
    assert summary["images"] == 32
