"""The web app in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import Server, headless_chrome, malaria_images

from cellcls.deploy.predict import predict_files
from cellcls.models.trained import load_model

from conftest import CHROMEDRIVER, CHROMIUM
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(malaria_run, tmp_path_factory):
    srv = Server(f"checkpoint={malaria_run}", "max_image_mb=0.5", cwd=tmp_path_factory.mktemp("browser-cwd"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    driver = headless_chrome()
    yield driver
    driver.quit()


def open_page(browser, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#model dd") is not None)


def upload_and_wait(browser, path: Path):
    """Choose ``path`` in the file input and wait for its result card to leave the pending state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "files").send_keys(str(path))
    selector = f'.result[data-name="{path.name}"]:not([data-status="pending"])'
    return WebDriverWait(browser, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, selector))


def test_page_shows_the_model_card(server, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    facts = {dt.text: dd.text for dt, dd in zip(browser.find_elements(By.CSS_SELECTOR, "#model dt"),
                                                browser.find_elements(By.CSS_SELECTOR, "#model dd"))}
    assert facts["Model"] == "lenet" and facts["Classes"] == "Uninfected, Parasitized"
    assert facts["Input"] == "64 × 64, RGB" and facts["Validation accuracy"].endswith("%")
    assert "(95% CI " in facts["Test accuracy"] and ", n = " in facts["Test accuracy"]
    assert facts["Started from"] == "random initialisation"  # a pretrained model names its weights (the card's)


def test_uploading_a_real_cell_image_shows_its_predicted_class_bars_and_grad_cam(server, browser, malaria_run):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    image = malaria_images(2)[0]
    card = upload_and_wait(browser, image)
    assert card.get_attribute("data-status") == "ok"
    expected, _ = predict_files(load_model(malaria_run, device="cpu"), [image])
    label = expected[0].label(["Uninfected", "Parasitized"])
    assert card.find_element(By.CLASS_NAME, "label").text == label
    bars = {b.get_attribute("data-class"): b.find_element(By.CLASS_NAME, "pct").text
            for b in card.find_elements(By.CLASS_NAME, "bar")}
    assert bars[label] == f"{100 * expected[0].probabilities.max():.2f}%" and set(bars) == {"Uninfected", "Parasitized"}
    cam = card.find_element(By.CSS_SELECTOR, "img.cam")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam) == 64
    assert "Grad-CAM attention" in card.find_element(By.CLASS_NAME, "legend").text  # the colour scale is explained


def test_a_bad_upload_shows_its_error_and_the_server_keeps_answering(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, server.url)
    bad = tmp_path / "report.png"
    bad.write_text("this is a text file with an image's name")
    card = upload_and_wait(browser, bad)
    assert card.get_attribute("data-status") == "error"
    assert "cannot decode image report.png: not an image file" in card.find_element(By.CLASS_NAME, "error").text
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty.png is empty" in upload_and_wait(browser, empty).text
    with urllib.request.urlopen(server.url + "health", timeout=10) as resp:
        assert json.load(resp) == {"status": "ok"}
    assert upload_and_wait(browser, malaria_images(2)[1]).get_attribute("data-status") == "ok"


def test_the_page_shows_the_prediction_set_and_flags_an_xray_shown_to_a_malaria_model(malaria_run, browser, tmp_path):
    from conftest import real_dataset
    from selenium.webdriver.common.by import By

    from conftest import calibrated_copy

    run = calibrated_copy(malaria_run, tmp_path, "conformal=0.9", "ood=0.95")
    srv = Server(f"checkpoint={run}", cwd=tmp_path)
    try:
        open_page(browser, srv.url)
        cell = upload_and_wait(browser, malaria_images(2)[0])
        note = cell.find_element(By.CLASS_NAME, "prediction-set")
        assert note.text.startswith("At 90.00% confidence: {") or note.text.startswith("Cannot tell")
        assert not [w for w in cell.find_elements(By.CLASS_NAME, "warning") if "outside" in w.text]
        xray = next(iter(sorted(real_dataset("pneumonia").rglob("*.jpeg"))))
        card = upload_and_wait(browser, xray)
        warnings = " ".join(w.text for w in card.find_elements(By.CLASS_NAME, "warning"))
        assert "outside what this model was trained on" in warnings
    finally:
        srv.stop()
