"""``pip install .`` works: a built wheel carries its configs and runs from any folder; users add config folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The package built as a wheel and installed into a fresh folder (deps come from the test environment)."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out / "dist"), str(REPO)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (out / "dist").glob("cellcls-*.whl")
    site = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_configs_inside_the_package(installed_wheel, tmp_path):
    result = run_installed(installed_wheel, tmp_path, "-c", "import cellcls.paths as p; print(p.config_dir())")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == installed_wheel / "cellcls" / "configs"
    for group in ("dataset", "model", "optim", "scheduler", "augment", "callbacks", "logger"):  # trainer: the schema
        assert any((installed_wheel / "cellcls" / "configs" / group).glob("*.yaml")), group


def test_the_installed_command_composes_its_config_from_any_folder(installed_wheel, tmp_path):
    result = run_installed(installed_wheel, tmp_path, "-m", "cellcls.train", "model=xray_cnn", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: xray_cnn" in result.stdout and "name: synthetic" in result.stdout
    assert "max_epochs: 15" in result.stdout  # the trainer schema, from the ConfigStore


def test_a_users_own_config_folder_adds_options_to_the_groups(installed_wheel, tmp_path):
    mine = tmp_path / "my_configs" / "dataset"
    mine.mkdir(parents=True)
    (mine / "my_cells.yaml").write_text(
        "defaults:\n  - synthetic\n  - _self_\nname: my_cells\nroot: /data/my_cells\nclasses: [healthy, sick]\n"
    )
    result = run_installed(
        installed_wheel, tmp_path, "-m", "cellcls.train", "--config-dir", str(tmp_path / "my_configs"),
        "dataset=my_cells", "--cfg", "job",
    )
    assert result.returncode == 0, result.stderr
    assert "name: my_cells" in result.stdout and "- healthy" in result.stdout and "batch_size: 32" in result.stdout


def test_the_wheel_ships_the_web_apps_page(installed_wheel, tmp_path):
    code = "from importlib import resources; print(len(resources.files('cellcls.deploy.web').joinpath('index.html').read_text()))"
    result = run_installed(installed_wheel, tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1000
