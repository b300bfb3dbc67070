"""Sweeps with Hydra's multirun (basic and joblib launchers), Optuna search, and DDP under torchrun."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_cli

pytestmark = pytest.mark.slow

TINY = [
    "dataset.render.train_per_class=48", "dataset.render.test_per_class=16", "dataset.render.size=32",
    "dataset.image_size=[32,32]", "trainer.progress_bar=false", "trainer.max_epochs=2",
]


def sweep_dir(cwd):
    (folder,) = (cwd / "outputs" / "multirun").glob("*/*")
    return folder


def summary(folder):
    with open(folder / "summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_a_multirun_trains_each_job_in_its_own_folder_and_writes_a_sorted_summary(tmp_path):
    result = run_cli("cellcls.train", "-m", "optim.lr=1e-3,3e-3", "model.dropout=0.0,0.5", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = sweep_dir(tmp_path)
    rows = summary(folder)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert sorted(r["run_dir"].rsplit("/", 1)[1] for r in rows) == ["0", "1", "2", "3"]
    values = [float(r["best"]) for r in rows]
    assert values == sorted(values)  # val_loss: best (lowest) first
    assert all(r["test_accuracy"] for r in rows)
    md = (folder / "summary.md").read_text()
    shared = next(ln for ln in md.splitlines() if ln.startswith("Shared by every job:"))
    assert "`trainer.progress_bar=" in shared and "optim.lr" not in shared
    table = md[md.index("| rank | status | overrides |"):].splitlines()[2:]
    assert len(table) == 4 and all("progress_bar" not in row and "optim.lr=" in row for row in table)
    assert {row.split(" | ")[-2] for row in table} == {"0/", "1/", "2/", "3/"}  # run folders relative to the sweep
    for job in "0123":
        assert (folder / job / "checkpoints" / "best.pt").is_file() and list((folder / job / "tensorboard").iterdir())


def test_one_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # xray_cnn cannot take 32x32 inputs: that job fails, the other two train
    result = run_cli("cellcls.train", "-m", "model=lenet,xray_cnn,resnet18", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = summary(sweep_dir(tmp_path))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    failed = rows[-1]
    assert "model=xray_cnn" in failed["overrides"] and "too small for this architecture" in failed["error"]
    record = json.loads((sweep_dir(tmp_path) / "1" / "result.json").read_text())
    assert record["status"] == "failed" and "Traceback" in record["traceback"]


needs_plugins = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
    reason="the sweep extra is not installed (pip install -e '.[sweep]')",
)


@needs_plugins
def test_the_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    result = run_cli("cellcls.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1,2", *TINY,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert [r["status"] for r in summary(sweep_dir(tmp_path))] == ["ok", "ok"]


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="the sweep extra is not installed (pip install -e '.[sweep]')")
def test_the_slurm_launcher_config_composes(tmp_path):
    result = run_cli("cellcls.train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "submitit_plugin.hydra_plugins.hydra_submitit_launcher" in result.stdout or "SlurmLauncher" in result.stdout
    assert "gpus_per_node: 1" in result.stdout and "partition: gpu" in result.stdout


def test_two_process_ddp_on_the_cpu_matches_one_process_with_the_same_global_batch(tmp_path):
    # Without shuffling, augmentation or dropout, two ranks of 16 see exactly the samples of one batch of 32
    # (DistributedSampler deals indices round-robin), and DDP averages their mean gradients: the gradients are the
    # single process' up to float summation order. SGD keeps updates linear in the gradients, so results agree to
    # ~1e-5 (Adam would not: it divides by sqrt(v), which magnifies order effects on near-zero gradient elements).
    same = [*TINY, "trainer.max_epochs=3", "dataset.val_fraction=0.3333", "dataset.shuffle=false", "augment=none",
            "model.dropout=0", "optim=sgd", "optim.lr=0.05"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cellcls.train",
         *same, "dataset.batch_size=16"],
        cwd=tmp_path / "", env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli("cellcls.train", *same, "dataset.batch_size=32", "hydra.run.dir=single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    runs = sorted((tmp_path / "outputs").glob("*/*_synthetic_lenet"))
    assert len(runs) == 1, f"one run folder for the two processes, found {runs}"
    ddp_dir, single_dir = runs[0], tmp_path / "single"
    with open(ddp_dir / "metrics.csv") as a, open(single_dir / "metrics.csv") as b:
        rows_ddp, rows_single = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert len(rows_ddp) == len(rows_single) == 3
    for r1, r2 in zip(rows_ddp, rows_single):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert float(r1[key]) == pytest.approx(float(r2[key]), rel=1e-4, abs=1e-5), key
    w_ddp = torch.load(ddp_dir / "checkpoints/last.pt", weights_only=True)["model"]
    w_one = torch.load(single_dir / "checkpoints/last.pt", weights_only=True)["model"]
    for key in w_one:
        torch.testing.assert_close(w_ddp[key], w_one[key], rtol=1e-4, atol=1e-5)
    assert "2 processes (DDP)" in ddp.stdout + ddp.stderr

    # resume under torchrun: continues from epoch 3 with the stored optimiser state, in one folder again
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cellcls.train",
         f"trainer.resume={ddp_dir}", "trainer.max_epochs=4", "hydra.run.dir=resumed"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert last["epoch"] == 4 and len(last["history"]) == 4
    with open(tmp_path / "resumed" / "metrics.csv") as fh:
        assert list(csv.DictReader(fh))[:3] == rows_ddp  # the first three epochs carried over unchanged
    state = last["training"]["optimizer"]["state"]
    assert len(state) == len(w_one) and all("momentum_buffer" in s for s in state.values())
