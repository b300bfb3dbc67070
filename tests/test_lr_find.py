"""``python -m cellcls.lr_find``: the range test finds a rate where the synthetic set's LeNet learns, and leaves no
run behind."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cellcls.training.lr_find import suggest

TINY = ["dataset.render.train_per_class=60", "dataset.render.test_per_class=10", "trainer.progress_bar=false",
        "logger=csv"]


def test_the_range_test_suggests_a_rate_where_the_loss_falls_and_leaves_no_run(tmp_path, monkeypatch, capsys):
    from cellcls.lr_find import main

    monkeypatch.chdir(tmp_path)
    assert main(["model=lenet", "steps=120", f"output={tmp_path / 'lrf'}", *TINY]) == 0
    printed = capsys.readouterr().out
    with open(tmp_path / "lrf" / "lr_find.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    lrs = np.array([float(r["lr"]) for r in rows])
    smoothed = np.array([float(r["smoothed"]) for r in rows])
    assert 20 <= len(rows) <= 120 and np.all(np.diff(lrs) > 0)
    suggested = float(printed.split("suggested learning rate ")[1].split()[0])
    assert 1e-5 <= suggested <= 1e-1  # Adam on LeNet learns at 1e-4 to 1e-2; 1e-7 and 10 are the range's ends
    i = int(np.searchsorted(lrs, suggested))
    assert smoothed[i + 2] < smoothed[i - 2] < smoothed[len(rows) // 10]  # falling there, below where it started
    assert "train with: python -m cellcls.train model=lenet" in printed and "optim.lr=" in printed
    assert (tmp_path / "lrf" / "lr_find.png").stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["lr_find.csv", "lr_find.png"]


def test_a_flat_loss_suggests_a_tenth_of_the_rate_of_its_minimum():
    lrs = list(np.logspace(-7, 0, 100))
    flat = [0.69 + 0.001 * np.sin(i) for i in range(90)] + [0.69 * 2 ** k for k in range(10)]
    suggestion, minimum, rule = suggest(lrs, flat)
    assert suggestion == pytest.approx(minimum / 10) and "did not fall by 5%" in rule


def test_a_falling_loss_suggests_its_steepest_point_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 120))
    x = np.log10(lrs)
    loss = 1.0 - 0.8 / (1 + np.exp(-(x + 3) * 4)) + np.where(x > -1.5, (x + 1.5) ** 2, 0)  # steepest at 1e-3
    suggestion, minimum, _ = suggest(lrs, list(loss))
    assert suggestion == pytest.approx(1e-3, rel=0.3) and suggestion < minimum


def test_bad_settings_are_refused_naming_them(capsys):
    from cellcls.lr_find import main

    assert main(["start_lr=1", "end_lr=0.1"]) == 2
    assert "start_lr=1 must be below end_lr=0.1" in capsys.readouterr().err
    assert main(["steps=5"]) == 2
    assert "steps" in capsys.readouterr().err
