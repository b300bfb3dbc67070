"""A read-only or full disk, and ports that cannot be used (issue 27, item 6): one `cellcls: error:` line naming the
folder or file and the ways out, exit 2, before any work is lost; never a traceback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """A read-only and a full file system (64 KiB tmpfs mounts): needs root and the right to mount."""
    base = tmp_path_factory.mktemp("disks")
    ro, full = base / "read_only", base / "full"
    ro.mkdir()
    full.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    mounted = []
    for folder, options in ((ro, "ro,size=64k"), (full, "size=64k")):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            for m in mounted:
                subprocess.run(["umount", str(m)])
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
    try:
        with open(full / "filler", "wb") as fh:
            fh.write(bytes(64 * 1024))
    except OSError:
        pass  # full
    yield ro, full
    for m in mounted:
        subprocess.run(["umount", str(m)])


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and result.stderr.count("cellcls: error:") == 1, result.stderr[-2000:]
    return result.stderr


@pytest.mark.parametrize("disk", ["read_only", "full"])
def test_training_into_a_read_only_or_full_folder_says_so_before_starting(disks, tmp_path, disk):
    folder = dict(zip(("read_only", "full"), disks))[disk] / "run"
    err = one_error_line(run_cli("cellcls.train", "dataset=synthetic", *TINY, f"hydra.run.dir={folder}", cwd=tmp_path))
    expected = "Read-only file system" if disk == "read_only" else "no space left to write"
    assert expected in err and str(folder) in err and "hydra.run.dir=<folder> for a training run" in err


def test_a_full_cache_disk_names_the_file_it_could_not_write(disks, tmp_path):
    env = {**os.environ, "CELLCLS_CACHE": str(disks[1] / "cache")}
    result = subprocess.run([os.sys.executable, "-m", "cellcls.train", "dataset=synthetic", *TINY,
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    err = one_error_line(result)
    assert "no space left to write " + str(disks[1] / "cache") in err and "None" not in err


def test_predict_and_export_into_a_read_only_or_full_disk_name_the_file(disks, one_epoch_run, tmp_path):
    image = next((one_epoch_run.parent).rglob("*.png"), None) or one_epoch_run / "training_curves.png"
    err = one_error_line(run_cli("cellcls.predict", f"checkpoint={one_epoch_run}", f"input={image}",
                                 f"output={disks[0] / 'p.csv'}", cwd=tmp_path))
    assert f"cannot write {disks[0]}: Read-only file system" in err
    err = one_error_line(run_cli("cellcls.export", f"checkpoint={one_epoch_run}", "format=torchscript",
                                 f"output={disks[1] / 'model.pt'}", cwd=tmp_path))
    assert f"no space left to write {disks[1] / 'model.pt'}" in err and "output=<file> for predict and export" in err


def test_serve_names_a_port_out_of_range_or_in_use(one_epoch_run, tmp_path):
    err = one_error_line(run_cli("cellcls.serve", f"checkpoint={one_epoch_run}", "port=99999", cwd=tmp_path))
    assert "port=99999 is not a TCP port" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_error_line(run_cli("cellcls.serve", f"checkpoint={one_epoch_run}", f"port={port}", cwd=tmp_path))
    assert f"port={port} on 127.0.0.1 is in use by another program" in err


def test_an_output_folder_check_writes_nothing_into_it(tmp_path):
    from cellcls.cli import check_writable

    check_writable(tmp_path / "new" / "folder")
    assert list((tmp_path / "new" / "folder").iterdir()) == []
    assert Path(tmp_path / "new" / "folder").is_dir()
