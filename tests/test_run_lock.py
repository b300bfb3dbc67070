"""One training run per run folder (issue 27, item 2): a second run into a held folder is refused by name and
writes nothing there; a lock its run left behind by dying does not block the next."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellcls.errors import RunFolderInUse
from cellcls.infra.run_folder import RunFolder
from cellcls.infra.run_lock import check_run_folder_free, run_folder_lock

from conftest import TINY, run_cli


def test_a_held_run_folder_refuses_a_second_lock_naming_the_holder(tmp_path: Path) -> None:
    with run_folder_lock(tmp_path / "run"):
        with pytest.raises(RunFolderInUse, match=rf"process {os.getpid()} on {socket.gethostname()}.*hydra.run.dir"):
            with run_folder_lock(tmp_path / "run"):
                pass
        with pytest.raises(RunFolderInUse):
            check_run_folder_free(tmp_path / "run")
    with run_folder_lock(tmp_path / "run"):  # released when the run ends
        pass
    check_run_folder_free(tmp_path / "run")


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from cellcls.infra.run_lock import run_folder_lock\n"
        "with run_folder_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)"),
        str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUse, match=f"process {holder.pid}"):
            check_run_folder_free(tmp_path / "run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunFolder(tmp_path / "run").lock.is_file()  # the record stays; the kernel released the lock itself
    with run_folder_lock(tmp_path / "run"):
        pass


@pytest.mark.slow
def test_two_train_commands_into_one_folder_one_trains_and_the_other_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "conc"
    first = subprocess.Popen([sys.executable, "-m", "cellcls.train", "dataset=synthetic", "trainer.resume=auto",
                              "trainer.max_epochs=1000", "callbacks.early_stopping=null", "seed=0", *TINY, "logger=csv",
                              f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not RunFolder(run).metrics.is_file():  # the first run is training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        hydra_files = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
        second = run_cli("cellcls.train", "dataset=synthetic", "trainer.resume=auto", "trainer.max_epochs=40",
                         "seed=7", *TINY, "logger=csv", f"hydra.run.dir={run}", cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert f"run folder {run} is in use by another training run (process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_files  # Hydra wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    record = json.loads(RunFolder(run).result.read_text())  # the first run's, stopped by SIGTERM
    assert record["status"] == "interrupted" and "seed=0" in record["overrides"]
    assert "seed=7" not in (run / "train.log").read_text()


def test_a_lock_path_that_is_a_folder_is_one_clear_error(tmp_path):
    from cellcls.errors import ConfigError

    (tmp_path / "run" / ".run.lock").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"cannot open its lock file .*\.run\.lock \(Is a directory\)"):
        with run_folder_lock(tmp_path / "run"):
            pass


def test_an_output_folder_that_is_a_file_is_named(tmp_path):
    from cellcls.cli import check_writable
    from cellcls.errors import ConfigError

    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match=r"taken is a file, not a folder"):
        check_writable(tmp_path / "taken")
