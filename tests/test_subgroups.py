"""``evaluate group_by=<column>``: metrics per value of a table's metadata column or a DICOM header field, on the
real malaria subset."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cellcls.errors import ConfigError
from cellcls.evaluation.evaluate import evaluate
from cellcls.evaluation.subgroups import banded, largest_gap
from conftest import malaria_images, real_dataset, write_dicom


def site_table(tmp_path, n=40):
    """``table.csv`` listing ``n`` real cells under ``images/`` (a link to the subset) with a made-up site: the
    cells of the first half of the patients at A, the rest at B."""
    (tmp_path / "images").symlink_to(real_dataset("malaria") / "cell_images")
    images = malaria_images(n)
    patients = sorted({p.name.split("_")[0] for p in images})
    at_a = set(patients[: len(patients) // 2])
    rows = [{"path": f"images/{p.parent.name}/{p.name}", "label": p.parent.name,
             "site": "A" if p.name.split("_")[0] in at_a else "B"} for p in images]
    with open(tmp_path / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "site"])
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "table.csv", rows


def test_results_per_site_are_each_sites_own_metrics_with_a_gap_and_a_figure(malaria_run, tmp_path):
    table, rows = site_table(tmp_path)
    result, out = evaluate(malaria_run, data=table, group_by="site", output=tmp_path / "eval")
    sub = result["by_subgroup"]
    assert [s["value"] for s in sub["subgroups"]] == ["A", "B"]
    with open(out / "predictions.csv", newline="") as fh:
        predicted = {r["file"]: r["true"] == r["predicted"] for r in csv.DictReader(fh)}
    for s in sub["subgroups"]:
        mine = [predicted[r["path"]] for r in rows if r["site"] == s["value"]]
        assert s["images"] == len(mine)
        assert s["accuracy"]["value"] == pytest.approx(np.mean(mine))
        lo, hi = s["accuracy"]["ci95"]
        assert lo <= s["accuracy"]["value"] <= hi
    gap = sub["largest_gap"]
    assert {gap["lower"], gap["higher"]} == {"A", "B"} and gap["difference"] >= 0
    with open(out / "subgroups.csv", newline="") as fh:
        assert [r["site"] for r in csv.DictReader(fh)] == ["A", "B"]
    assert (out / "subgroups.png").stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "## By site" in report and "Largest gap:" in report
    assert json.loads((out / "metrics.json").read_text())["by_subgroup"]["column"] == "site"


def test_a_column_the_table_lacks_is_refused_with_the_nearest_name(malaria_run, tmp_path):
    table, _ = site_table(tmp_path, n=6)
    with pytest.raises(ConfigError, match=r"no column 'stie'; did you mean 'site'\?.*its columns: path, label, site"):
        evaluate(malaria_run, data=table, group_by="stie", make_plots=False)


def test_images_in_folders_have_no_column_to_group_by_and_say_what_would(malaria_run):
    with pytest.raises(ConfigError, match="group_by='site' needs a metadata column.*table.*DICOM.*group_by=patient"):
        evaluate(malaria_run, group_by="site", make_plots=False)


def test_dicom_images_are_grouped_by_a_header_field(malaria_run, tmp_path):
    for i, source in enumerate(malaria_images(12)):
        folder = tmp_path / "dicom" / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(source).convert("L"))
        write_dicom(folder / f"{source.stem}.dcm", pixels, Manufacturer="ACME" if i % 3 else "Other")
    result, _ = evaluate(malaria_run, data=tmp_path / "dicom", group_by="Manufacturer", make_plots=False,
                         output=tmp_path / "eval")
    sub = result["by_subgroup"]
    assert {s["value"]: s["images"] for s in sub["subgroups"]} == {"ACME": 8, "Other": 4}


def test_many_numeric_values_become_quartile_bands_and_dicom_ages_are_years():
    ages = [str(a) for a in range(20, 60)]
    bands = banded(ages)
    assert sorted(set(bands)) == ["20-29.75", "29.75-39.5", "39.5-49.25", "49.25-59"]
    assert bands[0] == "20-29.75" and bands[-1] == "49.25-59"
    assert banded(["F", "M", "F"]) == ["F", "M", "F"]  # categories stay as they are
    assert banded(["1", "2", "1"]) == ["1", "2", "1"]  # few numeric values too
    dicom = banded([f"{a:03d}Y" for a in range(30, 70)] + ["018M"])
    assert dicom[-1].startswith("1.5-")  # 18 months: the youngest band


def test_the_largest_gap_ignores_subgroups_too_small_to_compare():
    def group(value, acc, groups):
        return {"value": value, "images": 30, "groups": groups,
                "accuracy": {"value": acc, "ci95": [acc - 0.05, min(1.0, acc + 0.05)]}}

    gap = largest_gap([group("big1", 0.9, 8), group("big2", 0.7, 6), group("tiny", 0.1, 1)])
    assert (gap["lower"], gap["higher"]) == ("big2", "big1")
    assert gap["difference"] == pytest.approx(0.2) and gap["intervals_overlap"] is False
