"""Checkpoints are written atomically and loaded safely."""

from __future__ import annotations

import pytest
import torch

from cellcls import checkpoint as ckpt


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert ckpt.load_checkpoint(path)["epoch"] == 1


def test_a_run_folder_resolves_to_its_last_checkpoint(tmp_path):
    ckpt.save_checkpoint({"epoch": 3}, tmp_path / "checkpoints" / "last.pt")
    assert ckpt.load_checkpoint(tmp_path)["epoch"] == 3


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": object()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        ckpt.load_checkpoint(path)


def test_a_file_that_is_not_a_cellcls_checkpoint_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pt is not a cellcls checkpoint"):
        ckpt.load_checkpoint(path)


def test_a_missing_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last.pt"):
        ckpt.load_checkpoint(tmp_path)
