"""A file from someone else never runs code: a checkpoint, a run's config.yaml, a model card or a search's
best.yaml that names a class to create outside cellcls's allow-list is refused by name, and nothing is touched."""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cellcls.config.targets import BUILTIN, allowed_targets, check_targets, register_target
from cellcls.errors import ConfigError
from tests.conftest import REPO, run_cli


def attack(marker: Path, victim: Path) -> dict:
    """The tampered section of the issue: a harmless-looking dict whose arguments touch a file and truncate another."""
    return {"_target_": "builtins.dict",
            "a": {"_target_": "pathlib.Path.touch", "self": str(marker)},
            "b": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}}


def tampered_run(one_epoch_run: Path, tmp_path: Path, section: str) -> tuple[Path, Path, Path]:
    """A copy of a real run whose best.pt carries the attack in ``section``; returns (run, marker, victim)."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    marker, victim = tmp_path / "marker", tmp_path / "victim.txt"
    victim.write_text("precious" * 1000)
    best = run / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    node = payload["config"]
    *parents, leaf = section.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = attack(marker, victim)
    torch.save(payload, best)
    return run, marker, victim


@pytest.mark.parametrize("section", ["logger.csv", "callbacks.run_record", "hydra.callbacks.sweep_summary",
                                     "dataset.anything", "model"])
def test_a_checkpoint_naming_foreign_code_in_any_section_is_refused_by_name(one_epoch_run, tmp_path, section):
    from cellcls.infra.checkpoint import load_checkpoint

    run, marker, victim = tampered_run(one_epoch_run, tmp_path, section)
    with pytest.raises(ConfigError, match=rf"{section}\._target_='builtins\.dict'.*refused for safety"):
        load_checkpoint(run / "checkpoints" / "best.pt")
    assert not marker.exists() and victim.read_text() == "precious" * 1000


@pytest.mark.parametrize("command", [
    ("cellcls.evaluate", "checkpoint={run}", "plots=false", "bootstrap=10"),
    ("cellcls.predict", "checkpoint={run}", "input={image}"),
    ("cellcls.export", "checkpoint={run}", "format=onnx", "output={tmp}/model.onnx"),
    ("cellcls.train", "trainer.resume={run}/checkpoints/best.pt", "hydra.run.dir={tmp}/resumed"),
])
def test_every_command_refuses_a_tampered_checkpoint_and_touches_no_file(one_epoch_run, tmp_path, command):
    run, marker, victim = tampered_run(one_epoch_run, tmp_path, "logger.csv")
    image = tmp_path / "cell.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 90)).save(image)
    module, *args = command
    args = [a.format(run=run, image=image, tmp=tmp_path) for a in args]
    if module == "cellcls.train":  # resume reads last.pt's config: tamper that one too
        shutil.copy(run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_cli(module, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "logger.csv._target_='builtins.dict'" in result.stderr and "refused for safety" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and victim.read_text() == "precious" * 1000
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and not str(p).startswith("resumed")] == []


def test_the_python_api_refuses_a_tampered_checkpoint(one_epoch_run, tmp_path):
    import cellcls

    run, marker, victim = tampered_run(one_epoch_run, tmp_path, "callbacks.early_stopping")
    with pytest.raises(ConfigError, match=r"callbacks\.early_stopping\._target_"):
        cellcls.load(run)
    assert not marker.exists() and victim.read_text() == "precious" * 1000


def test_evaluate_builds_its_loggers_from_this_cellcls_not_from_the_checkpoint(one_epoch_run, tmp_path):
    """The checkpoint's `csv` entry names another (allowed) class: evaluate still writes the CSV summary, from the
    csv option of its own configs, and starts no TensorBoard file."""
    from cellcls.evaluation.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    best = run / "checkpoints" / "best.pt"
    payload = torch.load(best, weights_only=True)
    payload["config"]["logger"] = {"csv": {"_target_": "cellcls.infra.loggers.TensorBoardLogger"}}
    torch.save(payload, best)
    evaluate(run, make_plots=False, n_boot=10)
    assert (run / "eval" / "summary.csv").is_file()
    assert not (run / "tensorboard").exists()


def test_a_run_folders_tampered_config_is_refused_by_the_audit(one_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.logger.csv = attack(tmp_path / "marker", tmp_path / "victim")
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    result = run_cli("cellcls.audit", f"run={run}", cwd=tmp_path)
    assert result.returncode == 2 and "config.yaml: logger.csv._target_='builtins.dict'" in result.stderr


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "a/../../outside.png"])
def test_a_split_list_naming_a_file_outside_the_data_root_is_refused(tmp_path, entry):
    from cellcls.data.splits import read_split_lists
    from cellcls.errors import DataError
    from cellcls.infra.run_folder import RunFolder

    root = tmp_path / "data"
    root.mkdir()
    run = RunFolder(tmp_path / "run")
    run.split_list("train").parent.mkdir(parents=True)
    run.split_list("train").write_text(f"file,class\na/1.png,x\n{entry},y\n")
    with pytest.raises(DataError, match=rf"train.csv line 3: '{re.escape(entry)}' is outside the data root {root}"):
        read_split_lists(run, root, ["x", "y"])
    run.split_list("train").write_text("file,class\na/1.png,x\na/../b/2.png,y\n")  # inside, however spelt
    assert read_split_lists(run, root, ["x", "y"])["train"].paths == [root / "a" / "1.png", root / "b" / "2.png"]


def test_a_model_card_naming_code_is_refused(one_epoch_run, tmp_path):
    from cellcls.deploy.export import export_model
    from cellcls.deploy.runtimes import load_exported
    from cellcls.models.trained import load_model

    path = export_model(load_model(one_epoch_run, "cpu"), "torchscript", tmp_path / "model.torchscript.pt")
    card = json.loads((tmp_path / "model.torchscript.pt.json").read_text())
    card["decision"] = attack(tmp_path / "marker", tmp_path / "victim")
    import zipfile

    with zipfile.ZipFile(path) as zf:  # rewrite the embedded card
        entries = {n: zf.read(n) for n in zf.namelist()}
    name = next(n for n in entries if n.endswith("extra/cellcls.json"))
    entries[name] = json.dumps(card).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in entries.items():
            zf.writestr(n, data)
    with pytest.raises(ConfigError, match=r"model card .*decision\._target_='builtins\.dict'"):
        load_exported(path)


def test_a_searchs_best_yaml_cannot_make_hydra_run_code(tmp_path):
    """Hydra creates `hydra.callbacks` before cellcls sees the config: the command line is checked first."""
    configs = tmp_path / "configs" / "experiment"
    configs.mkdir(parents=True)
    marker = tmp_path / "marker"
    (configs / "best.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        hydra:
          callbacks:
            evil:
              _target_: pathlib.Path.touch
              self: {marker}
        """))
    result = run_cli("cellcls.train", "--config-dir", str(tmp_path / "configs"), "experiment=best",
                     "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "hydra.callbacks.evil._target_='pathlib.Path.touch'" in result.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_hydra_logging_sections_may_name_only_logging_classes():
    check_targets({"hydra": {"job_logging": {"handlers": {"console": {"class": "logging.StreamHandler"}}}}})
    with pytest.raises(ConfigError, match=r"hydra\.job_logging\.handlers\.x\.class='subprocess\.Popen'"):
        check_targets({"hydra": {"job_logging": {"handlers": {"x": {"class": "subprocess.Popen", "args": "id"}}}}})
    with pytest.raises(ConfigError, match=r"hydra\.hydra_logging\.formatters\.f\.\(\)"):
        check_targets({"hydra": {"hydra_logging": {"formatters": {"f": {"()": "os.system"}}}}})


def test_a_mistyped_cellcls_class_is_refused_with_the_nearest_allowed_name():
    with pytest.raises(ConfigError, match="did you mean 'cellcls.infra.loggers.CSVLogger'"):
        check_targets({"logger": {"csv": {"_target_": "cellcls.infra.loggers.CSVLoger"}}})


def test_a_cellcls_class_is_refused_in_a_section_that_does_not_create_it():
    with pytest.raises(ConfigError, match=r"callbacks\.x\._target_='cellcls\.infra\.loggers\.CSVLogger'"):
        check_targets({"callbacks": {"x": {"_target_": "cellcls.infra.loggers.CSVLogger"}}})


def test_a_registered_class_of_ones_own_is_allowed(monkeypatch):
    from cellcls.config import targets

    monkeypatch.setattr(targets, "_registered", {s: set() for s in targets.SECTIONS})
    node = {"logger": {"mine": {"_target_": "mypkg.loggers.MyLogger"}}}
    with pytest.raises(ConfigError):
        check_targets(node)
    register_target("mypkg.loggers.MyLogger", "logger")
    check_targets(node)


def test_an_installed_plugin_declares_its_classes_by_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "mypkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cellcls.targets]\nmy_logger = mypkg.loggers:MyLogger\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mypkg.loggers.MyLogger" in allowed_targets("logger")
    check_targets({"logger": {"mine": {"_target_": "mypkg.loggers.MyLogger"}}})


def test_every_allowed_name_is_a_cellcls_class_and_every_shipped_config_target_is_allowed():
    from hydra.utils import get_class

    for section, names in BUILTIN.items():
        for name in names:
            assert isinstance(get_class(name), type), name
    for path in (REPO / "configs").rglob("*.yaml"):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        group = path.parent.name
        is_global = path.read_text().startswith("# @package _global_") or group == "configs"
        wrapped = cfg if is_global else {group: cfg}
        check_targets(wrapped, source=str(path))


def test_a_refused_target_is_never_imported(monkeypatch):
    sys.modules.pop("antigravity", None)
    with pytest.raises(ConfigError):
        from cellcls.config.targets import resolve_target

        resolve_target("antigravity.geohash", "callbacks")
    assert "antigravity" not in sys.modules


def test_a_config_written_before_the_loggers_moved_still_creates_them(tmp_path):
    from cellcls.config.targets import MOVED, instantiate
    from cellcls.infra.loggers import CSVLogger
    from cellcls.infra.run_folder import RunFolder

    old = OmegaConf.create({"_target_": "cellcls.training.loggers.CSVLogger"})
    assert "cellcls.training.loggers.CSVLogger" in MOVED
    check_targets({"logger": {"csv": old}})
    made = instantiate(old, "logger", _partial_=True)(run=RunFolder(tmp_path))
    assert isinstance(made, CSVLogger)
