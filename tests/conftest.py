"""Shared helpers: tiny synthetic data sets, in-process training runs and CLI subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

# A small, fast synthetic set (32 px) for runs that check mechanics rather than accuracy.
TINY = [
    "dataset.render.train_per_class=48",
    "dataset.render.test_per_class=16",
    "dataset.render.size=32",
    "dataset.image_size=[32,32]",
    "dataset.batch_size=16",
    "trainer.progress_bar=false",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder private to this test session, so the synthetic set is really rendered here."""
    return tmp_path_factory.mktemp("cellcls-cache")


@pytest.fixture(autouse=True)
def _private_cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLCLS_CACHE", str(cache_root))


def compose_config(*overrides: str) -> DictConfig:
    """The config ``python -m cellcls.train <overrides>`` would run with."""
    from cellcls.config import compose_config as compose

    return compose(overrides)


def train_in_process(run_dir: Path, *overrides: str) -> float:
    """Train in this process (fast: no interpreter start-up) exactly as the CLI does; returns the best value of
    the monitored metric."""
    from cellcls.training.run import train

    return float(train(compose_config(*overrides), run_dir, overrides)["best"])


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory, cache_root: Path) -> Path:
    """A run folder of one epoch on the tiny synthetic set (default settings), shared by tests that only read it."""
    run = tmp_path_factory.mktemp("one_epoch_run")
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is per test, not yet active here
        mp.setenv("CELLCLS_CACHE", str(cache_root))
        train_in_process(run, "trainer.max_epochs=1", "logger=csv", *TINY)
    return run


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` as a user runs it, from ``cwd``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


REPO = Path(__file__).resolve().parents[1]
# The real image subsets (../shared/data beside the checkout); override with CELLCLS_TEST_DATA.
SHARED_DATA = Path(os.environ.get("CELLCLS_TEST_DATA", REPO.parent / "shared" / "data"))


def real_dataset(name: str) -> Path:
    """The shared real subset of data set ``name``, or skip the test with the reason."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real {name} images not found at {folder} (set CELLCLS_TEST_DATA to the shared data folder)")
    return folder


def copy_images(src: Path, dst: Path, n: int, pattern: str = "*") -> list[Path]:
    """Copy the first ``n`` files of ``src`` (sorted) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.glob(pattern) if p.is_file())[:n]
    for f in files:
        shutil.copy2(f, dst / f.name)
    return [dst / f.name for f in files]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_root) -> Path:
    """LeNet trained on the default synthetic set as ``python -m cellcls.train`` would (shared by several tests)."""
    os.environ["CELLCLS_CACHE"] = str(cache_root)
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_in_process(run_dir, "trainer.progress_bar=false")
    return run_dir


@pytest.fixture(scope="session")
def malaria_run(tmp_path_factory, cache_root) -> Path:
    """LeNet trained briefly on the real malaria subset at 64 px, with a normalisation (for deploy tests)."""
    root = real_dataset("malaria")
    os.environ["CELLCLS_CACHE"] = str(cache_root)
    run_dir = tmp_path_factory.mktemp("malaria") / "run"
    train_in_process(run_dir, "dataset=malaria", f"dataset.root={root}", "dataset.image_size=[64,64]",
                     "dataset.mean=[0.5,0.5,0.5]", "dataset.std=[0.25,0.25,0.25]", "trainer.max_epochs=6",
                     "trainer.progress_bar=false")
    return run_dir


def calibrated_copy(run: Path, folder: Path, *settings: str) -> Path:
    """A copy of ``run`` in ``folder/run`` with ``python -m cellcls.calibrate <settings>`` applied to it."""
    from cellcls.calibrate import main

    shutil.copytree(run, folder / "run")
    assert main([f"checkpoint={folder / 'run'}", *settings, "device=cpu"]) == 0
    return folder / "run"


def write_dicom(path: Path, pixels, photometric: str = "MONOCHROME2", bits_stored: int = 8, **elements) -> Path:
    """A DICOM Part 10 file of ``pixels`` made with pydicom (patient ID PRIVATE-123 unless given)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PRIVATE-123"
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def malaria_images(n: int) -> list[Path]:
    """``n`` real cell images, alternating Parasitized and Uninfected."""
    root = real_dataset("malaria") / "cell_images"
    infected = sorted((root / "Parasitized").glob("*.png"))
    healthy = sorted((root / "Uninfected").glob("*.png"))
    return [p for pair in zip(infected, healthy) for p in pair][:n]


class Server:
    """``python -m cellcls.serve`` in a subprocess on a free port, stopped by :meth:`stop`."""

    def __init__(self, *args: str, cwd: Path) -> None:
        import re
        import time

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # one worker unless a test asks for more: a model per core in every server would crowd a 2-core CI box
        workers = [] if any(a.startswith("workers=") for a in args) else ["workers=1"]
        self.proc = subprocess.Popen([sys.executable, "-m", "cellcls.serve", *args, *workers, "port=0"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"open (http://[\w.\[\]:]+/)", line)
            if found:
                self.url = found.group(1)
                return
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc.stdout:
            self.proc.stdout.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def headless_chrome(log_requests: bool = False):
    """Debian's Chromium, headless, through its chromedriver; with ``log_requests``, every request the page makes is
    in ``driver.get_log("performance")``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    if log_requests:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver
