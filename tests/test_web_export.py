"""``export format=web``: the page classifies real images inside a real headless Chromium, as predict does, and
asks nothing of any other origin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMEDRIVER, CHROMIUM, headless_chrome, malaria_images, real_dataset
from PIL import Image

from cellcls.data.decode import decode_image
from cellcls.deploy.predict import predict_files
from cellcls.deploy.web_export import ORT_WEB_VERSION, TARBALL, export_web, runtime_files
from cellcls.errors import ConfigError
from cellcls.models.trained import load_model

REPO = Path(__file__).resolve().parents[1]
# .ci/run puts npm's tarball here (scripts/fetch_web_runtime.py); CELLCLS_ORT_WEB points elsewhere
RUNTIME = Path(os.environ.get("CELLCLS_ORT_WEB") or REPO / ".cache" / "npm" / TARBALL)
needs_runtime = pytest.mark.skipif(not RUNTIME.is_file(), reason=f"no {RUNTIME}: run python scripts/fetch_web_runtime.py "
                                   f"(or npm pack onnxruntime-web@{ORT_WEB_VERSION} --pack-destination .cache/npm)")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no headless browser: apt-get install chromium chromium-driver")


class StaticServer:
    """``python -m http.server`` over a folder, as the README tells users to open the export."""

    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(folder)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 12345 (http://127.0.0.1:12345/) ..."
        self.url = line.split("(", 1)[1].split(")", 1)[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def web_folder(malaria_run, tmp_path_factory):
    return export_web(load_model(malaria_run, device="cpu"), tmp_path_factory.mktemp("web") / "site", RUNTIME)


@pytest.fixture(scope="module")
def site(web_folder):
    server = StaticServer(web_folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chrome():
    driver = headless_chrome(log_requests=True)
    yield driver
    driver.quit()


def open_ready(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true' || /Cannot/.test(document.getElementById('status').textContent)"))
    assert driver.execute_script("return document.body.dataset.ready") == "true", driver.find_element("id", "status").text


def choose(driver, files: list[Path]) -> dict[str, object]:
    """Choose ``files`` in the page's file input at once and return each file's result card."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("document.getElementById('results').replaceChildren()")
    driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    WebDriverWait(driver, 120).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, '.result:not([data-status="pending"])')) == len(files))
    return {c.get_attribute("data-name"): c for c in driver.find_elements(By.CSS_SELECTOR, ".result")}


def requested_urls(driver) -> list[str]:
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def write_rgb16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one): H x W x 3 big-endian samples, filter 0 on each row."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def sixteen_bit_xray(folder: Path) -> Path:
    """A 16-bit greyscale PNG made from a real X-ray (its 8-bit values spread over 12 bits, as a detector's are)."""
    xray = sorted(real_dataset("pneumonia").rglob("*.jpeg"))[0]
    grey = np.asarray(Image.open(xray).convert("L"), dtype=np.uint16) * 16 + 100
    path = folder / "xray16.png"
    Image.fromarray(grey).save(path)
    return path


@needs_runtime
@needs_browser
def test_the_exported_page_classifies_real_images_in_the_browser_as_predict_does(web_folder, site, chrome, malaria_run, tmp_path):
    xrays = sorted(real_dataset("pneumonia").rglob("*.jpeg"))[:1]
    blood = sorted(real_dataset("blood_cells").rglob("*.jp*g"))[:1]
    files = [*malaria_images(4), *xrays, *blood, sixteen_bit_xray(tmp_path)]
    open_ready(chrome, site.url)
    cards = choose(chrome, files)
    expected, skipped = predict_files(load_model(malaria_run, device="cpu"), files)
    assert not skipped
    for path, want in zip(files, expected):
        card = cards[path.name]
        assert card.get_attribute("data-status") == "ok", card.text
        got = json.loads(card.get_attribute("data-probabilities"))
        assert list(got) == ["Uninfected", "Parasitized"]
        assert np.abs(np.array(list(got.values())) - want.probabilities).max() < 1e-4, path.name
        assert card.find_element("class name", "label").text == want.label(["Uninfected", "Parasitized"])
    assert "no image leaves this machine" in chrome.find_element("id", "model").text
    outside = [u for u in requested_urls(chrome) if not (u.startswith(site.url) or u.startswith(("data:", "blob:")))]
    assert not outside, outside


@needs_runtime
@needs_browser
def test_the_page_decodes_and_resizes_every_png_kind_as_cellcls_does(site, chrome, tmp_path):
    """Pixel for pixel: palette, grey + alpha, RGBA, 16-bit RGB and grey, to 1 and 3 channels at odd sizes."""
    cell = Image.open(malaria_images(1)[0]).convert("RGB")
    kinds = {"palette.png": cell.convert("P"), "la.png": cell.convert("LA"), "rgba.png": cell.convert("RGBA"),
             "grey.png": cell.convert("L"), "jpeg.jpg": cell}
    paths = []
    for name, im in kinds.items():
        im.save(tmp_path / name)
        paths.append(tmp_path / name)
    rgb16 = np.asarray(cell, dtype=np.uint16) * 257 + 3  # the high byte is the 8-bit value
    paths += [write_rgb16(tmp_path / "rgb16.png", rgb16), sixteen_bit_xray(tmp_path)]
    open_ready(chrome, site.url)
    from selenium.webdriver.common.by import By

    # a file input of the test's own: the page's input hands its files to the classifier and clears itself
    chrome.execute_script("const i = document.createElement('input'); i.type = 'file'; i.multiple = true; i.id = 'probe';"
                          "document.body.append(i)")
    chrome.find_element(By.ID, "probe").send_keys("\n".join(str(p) for p in paths))
    for channels, size in ((3, (37, 50)), (1, (64, 23)), (3, (200, 300))):
        got = chrome.execute_async_script("""
            const [channels, h, w, done] = arguments;
            const card = {input: {channels, height: h, width: w}, limits: {max_image_mb: 10, max_pixels: 5e7}};
            Promise.all(Array.from(document.getElementById('probe').files).map(async (f) =>
                [f.name, Array.from((await cellclsLocal.prepare(f, card)).pixels)])).then(done, (e) => done(String(e)));
        """, channels, *size)
        assert not isinstance(got, str), got
        assert sorted(name for name, _ in got) == sorted(p.name for p in paths)
        for name, pixels in got:
            want = decode_image(tmp_path / name, channels, size)  # C x H x W
            have = np.array(pixels, dtype=np.uint8).reshape(size[0], size[1], channels).transpose(2, 0, 1)
            assert np.array_equal(have, want), (name, channels, size, int(np.abs(have.astype(int) - want).max()))


@needs_runtime
@needs_browser
def test_the_page_says_why_it_cannot_read_a_dicom_or_a_text_file(site, chrome, tmp_path):
    from conftest import write_dicom

    dicom = write_dicom(tmp_path / "scan.dcm", np.zeros((32, 32), np.uint8))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    open_ready(chrome, site.url)
    cards = choose(chrome, [dicom, text, malaria_images(1)[0]])
    assert "the browser cannot decode DICOM" in cards["scan.dcm"].text
    assert cards["notes.png"].get_attribute("data-status") == "error" and "notes.png" in cards["notes.png"].text
    assert cards[malaria_images(1)[0].name].get_attribute("data-status") == "ok"  # the others are still classified


@needs_runtime
def test_the_folder_holds_everything_the_page_loads_and_the_runtimes_licence(web_folder):
    names = {p.relative_to(web_folder).as_posix() for p in web_folder.rglob("*") if p.is_file()}
    assert {"index.html", "local.js", "card.json", "model.onnx", "ort/LICENSE", "ort/ort.wasm.min.js",
            "ort/ort-wasm-simd-threaded.wasm", "ort/ort-wasm-simd-threaded.mjs"} <= names
    assert "MIT License" in (web_folder / "ort" / "LICENSE").read_text()
    card = json.loads((web_folder / "card.json").read_text())
    assert card["classes"] == ["Uninfected", "Parasitized"] and card["exported_as"] == "web"
    assert not Path(card["checkpoint"]).is_absolute()  # a published page does not show the training machine's paths


@needs_runtime
def test_the_runtime_is_downloaded_once_from_the_registry_and_checked(tmp_path, monkeypatch):
    registry = tmp_path / "registry" / "onnxruntime-web" / "-"
    registry.mkdir(parents=True)
    (registry / TARBALL).write_bytes(RUNTIME.read_bytes())
    server = StaticServer(tmp_path / "registry")
    try:
        monkeypatch.setenv("npm_config_registry", server.url)
        monkeypatch.setenv("CELLCLS_CACHE", str(tmp_path / "cache"))
        files = runtime_files()
        assert files["ort.wasm.min.js"].startswith(b"/*!") and len(files["ort-wasm-simd-threaded.wasm"]) > 1_000_000
        assert (tmp_path / "cache" / "npm" / TARBALL).is_file()
        (registry / TARBALL).write_bytes(b"tampered")
        assert runtime_files() == files  # the cached copy; the registry is not asked again
    finally:
        server.stop()


def test_a_tarball_that_is_not_npms_is_refused_by_name(tmp_path):
    fake = tmp_path / TARBALL
    fake.write_bytes(b"\x1f\x8b not the real package")
    with pytest.raises(ConfigError, match=rf"{TARBALL}.*sha512 differs.*npm pack onnxruntime-web@{ORT_WEB_VERSION}"):
        runtime_files(fake)


def test_an_offline_machine_is_told_how_to_bring_the_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("CELLCLS_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="cannot download the browser runtime.*runtime=<that .tgz>"):
        runtime_files()


def test_an_existing_folder_that_is_not_a_web_export_is_never_overwritten(malaria_run, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("do not delete")
    with pytest.raises(ConfigError, match="not an earlier web export"):
        export_web(load_model(malaria_run, device="cpu"), keep, tmp_path / "unused.tgz")
    assert (keep / "thesis.tex").read_text() == "do not delete"


@needs_runtime
@needs_browser
def test_serve_client_side_hands_the_model_to_the_browser_and_gets_no_image_back(malaria_run, chrome, tmp_path):
    from conftest import Server

    srv = Server(f"checkpoint={malaria_run}", "client_side=true", f"runtime={RUNTIME}", cwd=tmp_path)
    try:
        requested_urls(chrome)  # drop the log of earlier pages
        open_ready(chrome, srv.url)
        cell = malaria_images(1)[0]
        card = choose(chrome, [cell])[cell.name]
        (want,), _ = predict_files(load_model(malaria_run, device="cpu"), [cell])
        got = json.loads(card.get_attribute("data-probabilities"))
        assert np.abs(np.array(list(got.values())) - want.probabilities).max() < 1e-4
        urls = requested_urls(chrome)
        assert any(u.endswith("/model.onnx") for u in urls) and not any("/api/" in u for u in urls)
    finally:
        srv.stop()


@needs_runtime
@needs_browser
def test_an_int8_web_export_runs_in_the_browser_as_onnxruntime_runs_it(malaria_run, chrome, tmp_path):
    from cellcls.export import main as export_main

    site_dir = tmp_path / "int8-site"
    assert export_main([f"checkpoint={malaria_run}", "format=web", "quantize=int8", "max_drop=1", f"runtime={RUNTIME}",
                        f"output={site_dir}"]) == 0
    assert "quantization" in json.loads((site_dir / "card.json").read_text())
    server = StaticServer(site_dir)
    try:
        open_ready(chrome, server.url)
        files = malaria_images(3)
        cards = choose(chrome, files)
        from cellcls.deploy.runtimes import load_exported

        want, _ = predict_files(load_exported(site_dir / "model.onnx", device="cpu"), files)
        for path, w in zip(files, want):
            got = json.loads(cards[path.name].get_attribute("data-probabilities"))
            assert np.abs(np.array(list(got.values())) - w.probabilities).max() < 1e-4
    finally:
        server.stop()


@needs_runtime
@needs_browser
def test_a_multilabel_model_calls_each_finding_in_the_browser_as_predict_does(chrome, tmp_path):
    from conftest import train_in_process

    from cellcls.data.datamodule import resolve_root

    train_in_process(tmp_path / "run", "dataset=synthetic_multilabel", "dataset.render.train_per_class=60",
                     "dataset.render.test_per_class=10", "dataset.render.size=48", "dataset.image_size=[48,48]",
                     "model=lenet", "trainer.max_epochs=3", "trainer.progress_bar=false")
    loaded = load_model(tmp_path / "run", device="cpu")
    server = StaticServer(export_web(loaded, tmp_path / "site", RUNTIME))
    try:
        open_ready(chrome, server.url)
        files = sorted((resolve_root(loaded.config.dataset) / "images" / "test").glob("*.png"))[:6]
        cards = choose(chrome, files)
        expected, _ = predict_files(loaded, files)
        for path, want in zip(files, expected, strict=True):
            card = cards[path.name]
            got = json.loads(card.get_attribute("data-probabilities"))
            assert list(got) == ["ring", "stippling", "target"]
            assert np.abs(np.array(list(got.values())) - want.probabilities).max() < 1e-4, path.name
            assert card.find_element("class name", "label").text == want.label(loaded.classes)
    finally:
        server.stop()
