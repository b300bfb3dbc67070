"""Checkpoints are written atomically and loaded safely."""

from __future__ import annotations

import pytest
import torch

from cellcls.infra import checkpoint as ckpt
from cellcls.infra.checkpoint import Checkpoint


PREP = {"image_size": [32, 32], "channels": 3, "mean": None, "std": None}


def make(epoch: int) -> Checkpoint:
    return Checkpoint(epoch=epoch, model={"w": torch.ones(3)}, model_spec={"name": "lenet"}, classes=["a", "b"],
                      preprocessing=PREP, config={})


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(make(1), path)
    before = path.read_bytes()

    def crash(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(make(2), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert ckpt.load_checkpoint(path).epoch == 1


def test_a_run_folder_resolves_to_its_last_checkpoint(tmp_path):
    ckpt.save_checkpoint(make(3), tmp_path / "checkpoints" / "last.pt")
    assert ckpt.load_checkpoint(tmp_path).epoch == 3


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": f"{ckpt.FORMAT}/{ckpt.VERSION}", "payload": object()}, path)
    with pytest.raises(ValueError, match="evil.pt is not a cellcls checkpoint: it holds pickled Python objects"):
        ckpt.load_checkpoint(path)


def test_a_file_that_is_not_a_cellcls_checkpoint_is_named(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="other.pt is not a cellcls checkpoint"):
        ckpt.load_checkpoint(path)


def test_a_missing_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last.pt"):
        ckpt.load_checkpoint(tmp_path)


def test_a_version_1_checkpoint_still_loads_for_evaluation_but_not_for_resume(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": "cellcls-checkpoint/1", "epoch": 4, "model": {}, "model_spec": {"name": "lenet"},
                "classes": ["a", "b"], "preprocessing": PREP, "config": {}, "optimizer": {"state": {}},
                "early_stopping": {"best": 0.5, "best_epoch": 2, "wait": 2}}, path)
    old = ckpt.load_checkpoint(path)
    assert old.version == 1 and old.epoch == 4
    assert old.training["callbacks"]["early_stopping"]["wait"] == 2
    with pytest.raises(ValueError, match="version-1 checkpoint .* not resumed"):
        ckpt.require_resumable(old)


def test_a_checkpoint_from_a_newer_cellcls_is_refused_by_name(tmp_path):
    path = tmp_path / "new.pt"
    torch.save({"format": f"{ckpt.FORMAT}/{ckpt.VERSION + 1}"}, path)
    with pytest.raises(ValueError, match="newer cellcls"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a zip"])
def test_an_empty_or_truncated_checkpoint_is_named_with_what_is_wrong(tmp_path, content):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="best.pt is not a readable checkpoint: (empty|truncated)"):
        ckpt.load_checkpoint(path)


def test_a_plain_pickle_that_would_call_code_is_refused_for_safety_not_called_corrupt(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": f"{ckpt.FORMAT}/{ckpt.VERSION}", "x": Evil()}))
    with pytest.raises(ValueError, match="pickled Python objects .* refused for safety"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(ValueError, match="not a PyTorch file, or corrupt"):
        ckpt.load_checkpoint(tmp_path / "garbage.pt")


def damaged(payload: dict, kind: str) -> dict:
    model = payload["model"]
    first_conv = next(k for k, v in model.items() if v.ndim == 4)
    if kind == "NaN weights":
        model[first_conv] = torch.full_like(model[first_conv], float("nan"))
    elif kind == "a class added":
        payload["classes"] = [*payload["classes"], "extra"]
    elif kind == "a tensor of another shape":
        model[first_conv] = torch.zeros(3, 3, 3, 3)
    elif kind == "another architecture's spec":
        payload["model_spec"] = {**payload["model_spec"], "name": "resnet18"}
    elif kind == "no preprocessing":
        del payload["preprocessing"]
    elif kind == "no mean":
        del payload["preprocessing"]["mean"]
    return payload


@pytest.mark.parametrize(("kind", "message"), [
    ("NaN weights", r"holds weights that are not finite numbers \(NaN or infinite\) in 1 tensor\(s\), first 'features"),
    ("a class added", r"weights do not fit the model its spec and classes describe \(lenet, 3 classes.*size mismatch "
                      r"for classifier.* \(and 1 more\)"),
    ("a tensor of another shape", r"do not fit .*: size mismatch for features.0.weight"),
    ("another architecture's spec", r"model_spec does not describe a model cellcls can build \(resnet18, 2 classes"),
    ("no preprocessing", r"'preprocessing' \(the input recipe .*\) is missing"),
    ("no mean", r"preprocessing lacks \['mean'\]"),
])
def test_a_checkpoint_that_loads_but_cannot_predict_is_refused_naming_what_is_wrong(one_epoch_run, tmp_path, kind,
                                                                                     message):
    from cellcls.models.trained import load_model

    path = tmp_path / "best.pt"
    torch.save(damaged(torch.load(one_epoch_run / "checkpoints" / "best.pt", weights_only=True), kind), path)
    with pytest.raises(ValueError, match=message):
        load_model(path, "cpu")


def test_predict_and_export_refuse_a_nan_checkpoint_in_one_line(one_epoch_run, tmp_path):
    from conftest import run_cli

    path = tmp_path / "best.pt"
    torch.save(damaged(torch.load(one_epoch_run / "checkpoints" / "best.pt", weights_only=True), "NaN weights"), path)
    for module, args in (("cellcls.predict", [f"input={path}"]), ("cellcls.export", ["format=torchscript"])):
        result = run_cli(module, f"checkpoint={path}", *args, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.count("cellcls: error:") == 1 and "not finite numbers" in result.stderr
        assert "nan%" not in result.stdout and "Traceback" not in result.stderr


def test_resuming_a_diverged_run_without_a_checkpoint_says_why_it_has_none(tmp_path):
    from cellcls.training.sweep import write_status

    write_status(tmp_path, "diverged", [], "the training loss became NaN at epoch 1, step 3")
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last.pt\).*result.json says the run diverged: the "
                                                r"training loss became NaN"):
        ckpt.load_checkpoint(tmp_path)
