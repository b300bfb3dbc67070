"""``serve workers=<n>``: several real server processes on one port; a killed worker is replaced, and a stopped
server finishes the request it is in the middle of."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import Server, malaria_images


def workers_of(server: Server, n: int, deadline_s: float = 120) -> set[int]:
    """The server's worker processes (its children in the process tree), once there are ``n`` of them."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pids = {int(p) for p in children.read_text().split()}
        pids = {p for p in pids if "spawn" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")}
        if len(pids) >= n:
            return pids
        time.sleep(0.2)
    return set()


def answers_within(url: str, deadline_s: float = 120) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            return predict_ok(url)
        except OSError:
            time.sleep(0.2)
    return False


def predict_ok(url: str) -> bool:
    cell = malaria_images(1)[0]
    req = urllib.request.Request(url + "api/predict?cam=false", data=cell.read_bytes(), headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)["results"][0]["ok"]


@pytest.fixture
def two_workers(malaria_run, tmp_path):
    srv = Server(f"checkpoint={malaria_run}", "workers=2", cwd=tmp_path)
    yield srv
    srv.stop()


def test_two_workers_answer_on_one_port_and_a_killed_one_is_replaced(two_workers):
    url = two_workers.url
    first = workers_of(two_workers, 2)
    assert len(first) == 2 and answers_within(url)
    victim, survivor = sorted(first)
    os.kill(victim, signal.SIGKILL)
    assert all(predict_ok(url) for _ in range(10))  # the other worker keeps answering
    replaced = workers_of(two_workers, 2)
    assert len(replaced) == 2 and victim not in replaced and survivor in replaced
    with contextlib.suppress(ProcessLookupError):  # (the supervisor may have replaced it already)
        os.kill(survivor, signal.SIGKILL)  # now only the replacement can answer
    assert answers_within(url)


def test_a_stopped_server_finishes_the_request_it_is_receiving(two_workers):
    url = two_workers.url
    assert len(workers_of(two_workers, 2)) == 2 and answers_within(url)
    host, port = url.split("//")[1].rstrip("/").split(":")
    cell = malaria_images(1)[0]
    body = json.dumps({"images": [{"name": cell.name, "data": base64.b64encode(cell.read_bytes()).decode()}],
                       "cam": False}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.5)
        two_workers.proc.send_signal(signal.SIGTERM)  # while the body is still arriving
        time.sleep(0.5)
        conn.sendall(body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 20:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"ok":true' in answer
    assert two_workers.proc.wait(timeout=60) == 0  # and then it exits, workers and all
