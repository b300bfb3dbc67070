"""Nothing lost, nothing cryptic: divergence, preemption by a signal, stale temporaries, one error path."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, real_dataset, run_cli, train_in_process

# big enough that an epoch takes a while on 2 cores, so a signal lands mid-epoch
SLOW = [o for o in TINY if "render" not in o and "image_size" not in o] + [
    "dataset.render.train_per_class=400", "dataset.render.test_per_class=16", "dataset.render.size=64",
    "dataset.image_size=[64,64]", "trainer.max_epochs=3", "logger=csv", "callbacks.early_stopping=null",
]


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_sigterm_mid_epoch_writes_a_checkpoint_whose_resume_equals_the_uninterrupted_run(tmp_path):
    train_in_process(tmp_path / "straight", *SLOW)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "cellcls.train", *SLOW, f"hydra.run.dir={run}"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "cellcls: interrupted by SIGTERM" in err and "Traceback" not in err
    record = json.loads((run / "result.json").read_text())
    assert record["status"] == "interrupted"
    last = torch.load(run / "checkpoints/last.pt", weights_only=True)
    position = last["training"]["position"]
    assert position["epoch"] == last["epoch"] + 1 and position["step"] >= 1
    assert len(read_metrics(run)) == last["epoch"], "metrics.csv lists exactly the epochs last.pt holds"

    train_in_process(tmp_path / "resumed", f"trainer.resume={run}", *SLOW)
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    def without_time(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]

    assert without_time(read_metrics(tmp_path / "resumed")) == without_time(read_metrics(tmp_path / "straight"))


def test_resume_auto_continues_this_folders_last_checkpoint_or_starts_fresh(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "trainer.resume=auto", "trainer.max_epochs=1", "logger=csv", *TINY)
    assert [r["epoch"] for r in read_metrics(run)] == ["1"]
    train_in_process(run, "trainer.resume=auto", "trainer.max_epochs=2", "logger=csv", *TINY)
    assert [r["epoch"] for r in read_metrics(run)] == ["1", "2"]


def test_a_diverging_run_stops_at_once_keeps_no_nonfinite_checkpoint_and_says_what_to_try(tmp_path):
    result = run_cli("cellcls.train", "optim=sgd", "optim.lr=1e6", "trainer.monitor=val_accuracy",
                     "trainer.max_epochs=4", f"hydra.run.dir={tmp_path / 'run'}", *TINY, cwd=tmp_path)
    assert result.returncode == 3
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cellcls: error:")]
    assert len(lines) == 1 and "training diverged in epoch" in lines[0] and "lower optim.lr (now 1e+06)" in lines[0]
    assert "Traceback" not in result.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    if best.is_file():
        assert all(torch.isfinite(v).all() for v in torch.load(best, weights_only=True)["model"].values())


def test_skip_batch_is_bounded_and_still_ends_a_run_that_never_recovers(tmp_path):
    with pytest.raises(Exception, match="non-finite in every batch|training loss is nan"):
        train_in_process(tmp_path, "optim=sgd", "optim.lr=1e6", "trainer.on_nonfinite=skip_batch",
                         "trainer.max_skipped_batches=2", "trainer.max_epochs=3", "logger=csv", *TINY)


def test_stale_temporaries_of_a_killed_write_are_removed_when_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    train_in_process(run, "trainer.max_epochs=1", "logger=csv", *TINY)
    stale = run / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"")
    train_in_process(run, "trainer.resume=auto", "trainer.max_epochs=2", "logger=csv", *TINY)
    assert not stale.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip at all"])
def test_a_broken_checkpoint_gets_one_error_line_from_every_command(tmp_path, content):
    bad = tmp_path / "best.pt"
    bad.write_bytes(content)
    for module, args in (("cellcls.evaluate", [f"checkpoint={bad}"]),
                         ("cellcls.predict", [f"checkpoint={bad}", f"input={bad}"]),
                         ("cellcls.serve", [f"checkpoint={bad}", "port=0"]),
                         ("cellcls.train", [f"trainer.resume={bad}", f"hydra.run.dir={tmp_path / 'r'}"])):
        result = run_cli(module, *args, cwd=tmp_path)
        assert result.returncode == 2, (module, result.stderr[-1500:])
        assert "is not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr, module
        assert result.stderr.count("cellcls: error:") == 1, module


@pytest.mark.parametrize("where", ["missing", "empty_run"])
def test_resuming_from_nothing_is_one_error_line(tmp_path, where):
    (tmp_path / "empty_run").mkdir()
    result = run_cli("cellcls.train", "dataset=synthetic", f"trainer.resume={tmp_path / where}",
                     f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.count("cellcls: error: no checkpoint at") == 1


def test_a_run_that_fails_before_its_first_epoch_is_marked_failed(tmp_path):
    result = run_cli("cellcls.train", "dataset=malaria", f"dataset.root={tmp_path / 'missing'}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("no such folder") == 1
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


def test_a_file_name_that_is_not_utf8_trains_and_is_listed(tmp_path):
    from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic

    src = ensure_synthetic(SyntheticSpec(train_per_class=24, test_per_class=6, size=32))
    data = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("uninfected", "parasitized"):
            (data / split / cls).mkdir(parents=True)
            for i, f in enumerate(sorted((src / split / cls).glob("*.png"))):
                name = f.name.encode() if i else b"odd\xff\xfe" + f.name.encode()
                (data / split / cls / os.fsdecode(name)).write_bytes(f.read_bytes())
    train_in_process(tmp_path / "run", f"dataset.root={data}", "trainer.max_epochs=1", "logger=csv", *TINY)
    listed = b"".join((tmp_path / "run" / "splits" / f"{s}.csv").read_bytes() for s in ("train", "val", "test"))
    assert b"odd\xff\xfe" in listed


def test_an_unreadable_image_whose_name_is_not_utf8_is_warned_about_in_the_log_file(tmp_path):
    from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic

    src = ensure_synthetic(SyntheticSpec(train_per_class=24, test_per_class=6, size=32))
    data = tmp_path / "data"
    shutil.copytree(src, data)
    (data / "train" / "uninfected" / os.fsdecode(b"broken\xff.png")).write_bytes(b"not a png")
    result = run_cli("cellcls.train", "dataset=folder", f"dataset.root={data}", "trainer.max_epochs=1", "logger=csv",
                     "dataset.image_size=[32,32]", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Logging error" not in result.stderr and "UnicodeEncodeError" not in result.stderr
    log_file = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "skipped 1 unreadable image(s)" in log_file and "broken\\udcff.png" in log_file


def test_sigterm_while_the_cache_is_first_decoded_stops_at_once_and_leaves_nothing_half_written(tmp_path):
    root = real_dataset("malaria")
    cache = tmp_path / "cache"
    env = {**os.environ, "CELLCLS_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cellcls.train", "dataset=malaria", f"dataset.root={root}",
                             "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((cache / "decoded").glob(".*.pid*")):  # decoding the training split
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "interrupted by SIGTERM before the first epoch" in err
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "interrupted" and "run the same command again" in record["error"]
    assert not list((cache / "decoded").glob(".*"))  # the half-written entry went with it


def test_sigterm_while_best_pt_is_tested_lets_the_test_finish_and_the_run_complete(tmp_path, monkeypatch, caplog):
    from cellcls.training import fit

    original = fit.finish

    def signalled(state):  # the scheduler's SIGTERM arrives as the final test starts
        os.kill(os.getpid(), signal.SIGTERM)
        return original(state)

    monkeypatch.setattr(fit, "finish", signalled)
    train_in_process(tmp_path / "run", "trainer.max_epochs=1", "logger=csv", *TINY)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "ok"
    assert (tmp_path / "run" / "test_metrics.json").is_file()
    assert "SIGTERM received: finishing the test of best.pt first" in caplog.text
    assert "the test finished and the run is complete" in caplog.text


def test_one_pixel_limit_skips_huge_images_in_training(tmp_path, monkeypatch):
    from PIL import Image

    from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic

    src = ensure_synthetic(SyntheticSpec(train_per_class=24, test_per_class=6, size=32))
    data = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("uninfected", "parasitized"):
            (data / split / cls).mkdir(parents=True)
            for f in sorted((src / split / cls).glob("*.png")):
                (data / split / cls / f.name).write_bytes(f.read_bytes())
    Image.new("RGB", (3000, 2000)).save(data / "train" / "uninfected" / "huge.png")
    monkeypatch.setenv("CELLCLS_MAX_PIXELS", "5000000")
    train_in_process(tmp_path / "run", f"dataset.root={data}", "trainer.max_epochs=1", "logger=csv", *TINY)
    skipped = (tmp_path / "run" / "skipped_files.txt").read_text()
    assert "huge.png" in skipped and "over the limit of 5,000,000 pixels" in skipped


def test_export_without_the_onnx_packages_names_the_extra_to_install(one_epoch_run, tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("onnx", "onnxscript"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    result = subprocess.run([sys.executable, "-m", "cellcls.export", f"checkpoint={one_epoch_run}", "format=onnx",
                             f"output={tmp_path / 'm.onnx'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2 and 'pip install "cellcls[deploy]"' in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_under_submitit_sigusr2_checkpoints_first_then_hands_over_for_the_requeue(tmp_path):
    """submitit requeues a preempted job from its SIGUSR2 handler and exits at once; cellcls takes the signal first,
    writes the exact position and the status, then calls that handler. A stand-in handler records the hand-over."""
    run, marker = tmp_path / "run", tmp_path / "requeued"
    script = (
        "import os, signal, sys\n"
        f"signal.signal(signal.SIGUSR2, lambda s, f: (open({str(marker)!r}, 'w').write('requeued'), os._exit(0)))\n"
        "import cellcls\n"
        f"cellcls.train({SLOW!r}, run_dir={str(run)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.csv").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and marker.read_text() == "requeued", err[-2000:]
    assert json.loads((run / "result.json").read_text())["status"] == "interrupted"
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["training"]["position"]["step"] >= 1
    train_in_process(run, "trainer.resume=auto", *SLOW)  # the requeued job
    assert [r["epoch"] for r in read_metrics(run)] == ["1", "2", "3"]


def test_inspect_reports_a_decompression_bomb_instead_of_crashing(tmp_path):
    import shutil

    from PIL import Image

    from cellcls.data.synthetic import SyntheticSpec, ensure_synthetic

    shutil.copytree(ensure_synthetic(SyntheticSpec(train_per_class=10, test_per_class=4, size=32)), tmp_path / "data")
    Image.new("1", (30000, 30000)).save(tmp_path / "data" / "train" / "uninfected" / "bomb.png")  # 900 MP, 110 kB
    result = run_cli("cellcls.data.inspect", f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 over the pixel limit (skipped in training)" in result.stdout and "bomb.png" in result.stdout
