"""The web app's JSON API, served for real by ``python -m cellcls.serve`` in a subprocess."""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import Server, malaria_images, write_dicom
from PIL import Image

from cellcls.data.preprocessing import Preprocessing
from cellcls.deploy.export import export_model
from cellcls.deploy.predict import predict_files
from cellcls.models.trained import load_model


def call(url: str, body: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def upload(name: str, data: bytes) -> dict[str, str]:
    return {"name": name, "data": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-cwd")


@pytest.fixture(scope="module")
def server(malaria_run, workdir):
    srv = Server(f"checkpoint={malaria_run}", "max_image_mb=0.5", "max_pixels=4000000", cwd=workdir)
    yield srv
    srv.stop()


def test_info_shows_the_model_its_classes_input_size_and_validation_metrics(server):
    status, info = call(server.url + "api/info")
    assert status == 200
    assert info["model"] == "lenet" and info["classes"] == ["Uninfected", "Parasitized"]
    assert (info["input"]["height"], info["input"]["width"]) == (64, 64)
    assert 0 <= info["metrics"]["val"]["accuracy"] <= 1 and info["gradcam"] is True
    assert info["checkpoint"] == "run/checkpoints/best.pt"  # not the server's file layout
    limits = {k: info["limits"][k] for k in ("max_image_mb", "max_pixels", "max_images", "body_timeout_s")}
    assert limits == {"max_image_mb": 0.5, "max_pixels": 4000000, "max_images": 8, "body_timeout_s": 30.0}


def test_predict_endpoint_gives_the_predict_commands_answer_on_real_cells(server, malaria_run):
    files = malaria_images(6)
    status, out = call(server.url + "api/predict", {"images": [upload(p.name, p.read_bytes()) for p in files]})
    assert status == 200
    expected, _ = predict_files(load_model(malaria_run, device="cpu"), files)
    for result, pred in zip(out["results"], expected):
        assert result["ok"] and result["name"] == pred.file.name
        assert result["label"] == pred.label(["Uninfected", "Parasitized"])
        assert abs(result["probabilities"]["Parasitized"] - float(pred.probabilities[1])) < 1e-5
        cam = Image.open(io.BytesIO(base64.b64decode(result["cam_png"])))
        assert cam.size == (64, 64) and cam.mode == "RGB"


def bomb_png() -> bytes:
    # 3000 x 3000 of one colour: ~9 megapixels that compress to a few kilobytes
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("name", "data", "message"), [
    ("empty.png", b"", "empty.png is empty (0 bytes)"),
    ("notes.png", b"these are notes, not pixels", "cannot decode image notes.png: not an image file"),
    ("huge.png", b"\x89PNG" + bytes(600 * 1024), "huge.png is 0.6 MB; the limit is 0.5 MB per image"),
    ("bomb.png", bomb_png(), "bomb.png: 3000x3000 pixels is over the limit of 4,000,000 pixels"),
    ("cut.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "cannot decode image cut.png"),
])
def test_a_bad_upload_gets_its_reason_and_the_others_still_get_answers(server, name, data, message):
    good = malaria_images(1)[0]
    status, out = call(server.url + "api/predict", {"images": [upload(name, data), upload(good.name, good.read_bytes())]})
    assert status == 200
    bad, ok = out["results"]
    assert not bad["ok"] and message in bad["error"] and bad["label"] is None
    assert ok["ok"] and ok["label"] in ("Uninfected", "Parasitized")
    assert call(server.url + "health") == (200, {"status": "ok"})


def test_a_dicom_upload_is_classified_as_its_pixels_and_no_header_data_comes_back(server, tmp_path):
    pytest.importorskip("pydicom", reason="DICOM support is the optional extra cellcls[dicom]")
    import numpy as np

    cell = malaria_images(1)[0]
    pixels = np.asarray(Image.open(cell).convert("RGB"))
    dicom = write_dicom(tmp_path / "cell.dcm", pixels, "RGB", PatientName="Doe^Jane")
    status, out = call(server.url + "api/predict", {"images": [upload("cell.dcm", dicom.read_bytes()),
                                                               upload(cell.name, cell.read_bytes())]})
    assert status == 200
    from_dicom, from_png = out["results"]
    assert from_dicom["ok"] and from_dicom["label"] == from_png["label"]
    for cls, p in from_png["probabilities"].items():
        assert abs(from_dicom["probabilities"][cls] - p) < 1e-5
    text = json.dumps(out)
    assert "PRIVATE-123" not in text and "Doe" not in text


def test_malformed_requests_get_4xx_with_a_reason_and_the_server_stays_up(server):
    assert call(server.url + "api/predict", {"images": []})[0] == 422
    status, out = call(server.url + "api/predict", {"images": [{"name": "x.png", "data": "not base64!"}]})
    assert status == 200 and out["results"][0]["error"] == "x.png: data is not valid base64"
    assert call(server.url + "api/predict", raw=b"{not json")[0] == 422
    status, out = announce_body(server.url, server_body_limit() + 1)
    assert status == 413 and "request body is" in out["detail"]
    assert call(server.url + "health") == (200, {"status": "ok"}) and server.alive()


def announce_body(url: str, length: int) -> tuple[int, dict]:
    """A POST whose Content-Length announces ``length`` bytes; the server must answer before any is sent."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.load(resp)
    finally:
        conn.close()


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams():
    import asyncio

    from starlette.responses import PlainTextResponse

    from cellcls.deploy.webapp import BodyLimit

    async def echo(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await PlainTextResponse(f"{len(body)} bytes")(scope, receive, send)

    def run(chunks: list[bytes]) -> list[dict]:
        sent: list[dict] = []
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/",
                 "headers": [(b"transfer-encoding", b"chunked"), (b"content-type", b"application/json")]}
        from starlette.exceptions import HTTPException

        try:
            asyncio.run(BodyLimit(echo, limit=10)(scope, receive, send))
        except HTTPException as exc:
            sent.append({"type": "refused", "status": exc.status_code})
        return sent

    assert run([b"12345", b"12345"])[0]["status"] == 200
    outcome = run([b"12345", b"123456", b"1"])
    assert outcome[-1] == {"type": "refused", "status": 413} and len(outcome) == 1


def server_body_limit() -> int:
    from cellcls.deploy.server import Limits

    return Limits(max_image_mb=0.5, max_pixels=4000000).max_body_bytes


def test_uploads_are_never_written_to_disk(server, workdir, malaria_run):
    before = sorted(p for p in malaria_run.rglob("*") if "export" not in p.parts)
    good = malaria_images(1)[0]
    call(server.url + "api/predict", {"images": [upload("a.png", good.read_bytes()), upload("b.png", b"junk")]})
    assert list(workdir.iterdir()) == []
    assert sorted(p for p in malaria_run.rglob("*") if "export" not in p.parts) == before


def test_the_server_binds_to_localhost_unless_told(server):
    assert server.url.startswith("http://127.0.0.1:")


def test_an_exported_onnx_model_is_served_without_grad_cam(malaria_run, tmp_path):
    path = export_model(load_model(malaria_run, device="cpu"), "onnx", tmp_path / "m.onnx")
    srv = Server(f"checkpoint={path}", cwd=tmp_path)
    try:
        assert call(srv.url + "api/info")[1]["gradcam"] is False
        good = malaria_images(1)[0]
        status, out = call(srv.url + "api/predict", {"images": [upload(good.name, good.read_bytes())]})
        assert status == 200 and out["results"][0]["ok"] and out["results"][0]["cam_png"] is None
    finally:
        srv.stop()


def test_serve_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="no checkpoint|not found|No such|does not exist"):
        Server(f"checkpoint={tmp_path / 'nothing'}", cwd=tmp_path)


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def multipart(*files: tuple[str, str, bytes], boundary: str = "cellclsboundary") -> tuple[bytes, str]:
    """A multipart/form-data body as curl -F writes it: (field, filename, bytes) parts."""
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for field, name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_file_fields_get_the_same_answers_as_the_json_form(server):
    cells = malaria_images(3)[:2]
    body, kind = multipart(*(("file", c.name, c.read_bytes()) for c in cells))
    status, out = post(server.url + "api/predict?cam=false", body, kind)
    _, want = call(server.url + "api/predict", {"images": [upload(c.name, c.read_bytes()) for c in cells], "cam": False})
    assert status == 200 and [r["name"] for r in out["results"]] == [c.name for c in cells]
    assert [r["probabilities"] for r in out["results"]] == [r["probabilities"] for r in want["results"]]
    assert all(r["cam_png"] is None for r in out["results"])


def test_a_raw_image_body_is_classified_under_the_name_in_the_query(server):
    cell = malaria_images(1)[0]
    status, out = post(server.url + "api/predict?name=mine.png", cell.read_bytes(), "image/png")
    _, want = call(server.url + "api/predict", {"images": [upload(cell.name, cell.read_bytes())]})
    assert status == 200 and out["results"][0]["name"] == "mine.png" and out["results"][0]["cam_png"]
    assert out["results"][0]["probabilities"] == want["results"][0]["probabilities"]


def test_raw_and_multipart_uploads_meet_the_same_limits_as_json(server):
    status, out = post(server.url + "api/predict", b"not an image", "image/png")
    assert status == 200 and "cannot decode image upload" in out["results"][0]["error"]
    big = b"\x89PNG" + bytes(int(0.6 * 2**20))  # over max_image_mb=0.5
    body, kind = multipart(("file", "big.png", big))
    status, out = post(server.url + "api/predict", body, kind)
    assert status == 200 and "big.png is 0.6 MB; the limit is 0.5 MB" in out["results"][0]["error"]
    body, kind = multipart(*(("file", f"{i}.png", b"x") for i in range(9)))
    status, out = post(server.url + "api/predict", body, kind)
    assert status == 413 and "the limit is 8" in out["detail"]


def test_a_form_without_a_file_field_and_a_body_in_no_known_form_are_refused_by_name(server):
    body = b"--x\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--x--\r\n"
    status, out = post(server.url + "api/predict", body, "multipart/form-data; boundary=x")
    assert status == 422 and "no file field" in out["detail"]
    status, out = post(server.url + "api/predict", b"hello", "text/plain")
    assert status == 415 and all(form in out["detail"] for form in ("application/json", "multipart/form-data", "--data-binary"))
    assert call(server.url + "health")[0] == 200


def test_the_api_schema_documents_all_three_request_forms(server):
    with urllib.request.urlopen(server.url + "openapi.json", timeout=30) as resp:
        schema = json.load(resp)
    forms = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/*"} <= set(forms)
    assert forms["application/json"]["schema"]["properties"]["images"]["items"]["properties"]["data"]


def test_ready_answers_once_the_model_is_loaded(server):
    status, out = call(server.url + "ready")
    assert status == 200 and out["status"] == "ready" and out["pid"] > 0


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(malaria_run):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cellcls.deploy.predictor import load_predictor
    from cellcls.deploy.server import Classifier, Limits

    predictor = load_predictor(malaria_run, "cpu")
    batches: list[int] = []
    original = predictor.predict
    gate = threading.Event()

    def counting(images):
        gate.wait(5)  # hold the first pass so that the others queue up behind it
        batches.append(len(images))
        return original(images)

    predictor.predict = counting
    classifier = Classifier(predictor, Limits())
    files = malaria_images(12)
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(classifier.classify, p.name, p.read_bytes(), False) for p in files]
        gate.set()
        results = [f.result() for f in futures]
    assert sum(batches) == 12 and len(batches) < 12, batches
    expected, _ = predict_files(load_model(malaria_run, "cpu"), files)
    for got, want in zip(results, expected):
        assert got["ok"] and got["label"] == want.label(predictor.classes)
        assert got["confidence"] == pytest.approx(float(want.probabilities.max()), abs=1e-6)


def test_slow_headers_and_slow_bodies_are_cut_off(malaria_run, tmp_path):
    import socket
    import time

    srv = Server(f"checkpoint={malaria_run}", "header_timeout_s=1", "body_timeout_s=1", cwd=tmp_path)
    try:
        host, port = urllib.parse.urlsplit(srv.url).hostname, urllib.parse.urlsplit(srv.url).port
        with socket.create_connection((host, port), timeout=10) as sock:  # headers that never end
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert sock.recv(1024) == b"" and time.monotonic() - started < 5  # closed by the server
        with socket.create_connection((host, port), timeout=10) as sock:  # a body announced but never sent
            sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert call(srv.url + "health")[0] == 200
    finally:
        srv.stop()


class _Fixed:
    """A predictor that always answers ``probs`` (to pin the uncertainty rule), trained on RGB cells of 100-150 px."""

    classes = ["Uninfected", "Parasitized"]
    supports_cam = False
    threshold = None
    findings = None  # a single-label model (the Predictor protocol's multi-label rule)
    path = Path("fixed")
    card: dict = {}

    def __init__(self, probs: list[float]) -> None:
        self.probs = probs
        self.preprocessing = Preprocessing((64, 64), 3, reference={
            "width": [100, 150], "height": [100, 150], "modes": ["RGB"], "intensity": [0.3, 0.7]})

    def predict(self, images):
        import numpy as np

        return np.tile(np.asarray(self.probs, dtype=np.float32), (len(images), 1))

    def assess(self, images):
        return self.predict(images), None

    @property
    def decision(self):
        from cellcls.scoring.heads import Decision

        return Decision(threshold=self.threshold)


def png(size: tuple[int, int], mode: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_narrow_lead_is_marked_uncertain_and_a_clear_one_is_not():
    from cellcls.deploy.server import Classifier, Limits

    image = png((120, 120), "RGB", 128)
    assert Classifier(_Fixed([0.45, 0.55]), Limits()).classify("a.png", image, False)["uncertain"] is True
    assert Classifier(_Fixed([0.05, 0.95]), Limits()).classify("a.png", image, False)["uncertain"] is False
    assert Classifier(_Fixed([0.3, 0.7]), Limits(uncertain_margin=0.5)).classify("a.png", image, False)["uncertain"]


def test_the_server_labels_with_the_models_operating_point():
    from cellcls.deploy.server import Classifier, Limits

    sensitive = _Fixed([0.7, 0.3])
    sensitive.threshold = 0.25  # fitted for a target sensitivity: class 1 from p = 0.25 on
    image = png((120, 120), "RGB", 128)
    assert Classifier(sensitive, Limits()).classify("a.png", image, False)["label"] == "Parasitized"
    assert Classifier(_Fixed([0.7, 0.3]), Limits()).classify("a.png", image, False)["label"] == "Uninfected"


def test_an_upload_unlike_the_training_images_is_classified_with_warnings():
    from cellcls.deploy.server import Classifier, Limits

    classifier = Classifier(_Fixed([0.1, 0.9]), Limits())
    assert classifier.classify("cell.png", png((120, 120), "RGB", 128), False)["warnings"] == []
    odd = classifier.classify("xray.png", png((3000, 2000), "L", 250), False)
    assert odd["ok"] and odd["label"] == "Parasitized"
    text = " ".join(odd["warnings"])
    assert "3000x2000 px" in text and "greyscale image" in text and "brightness 0.98" in text


def test_a_greyscale_upload_is_usual_for_a_model_trained_on_mostly_greyscale_files():
    import numpy as np

    from cellcls.data.reference import unusual

    # Kermany's chest X-ray training folder: 340 L files and 14 RGB ones
    reference = {"width": [200, 300], "height": [200, 300], "modes": ["L", "RGB"], "intensity": [0.2, 0.8]}
    image = np.full((1, 64, 64), 128, np.uint8)
    assert unusual(reference, 256, 256, "L", image) == []
    assert unusual(reference, 256, 256, "RGB", image) == []
    assert "greyscale image" in " ".join(unusual({**reference, "modes": ["RGB"]}, 256, 256, "L", image))


def test_the_card_gives_the_test_accuracy_with_its_interval_and_number_of_images(server):
    status, info = call(server.url + "api/info")
    test = info["metrics"]["test"]
    lo, hi = test["accuracy_ci95"]
    assert status == 200 and test["num_images"] > 0 and lo <= test["accuracy"] <= hi
