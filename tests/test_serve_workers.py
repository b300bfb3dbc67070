"""``serve workers=<n>``: several real server processes on one port; a killed worker is replaced, and a stopped
server finishes the request it is in the middle of."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import urllib.request

import pytest
from conftest import Server, malaria_images


def ready_pid(url: str) -> int:
    with urllib.request.urlopen(url + "ready", timeout=30) as resp:
        return json.load(resp)["pid"]


def worker_pids(url: str, n: int, deadline_s: float = 120) -> set[int]:
    """The pids of ``n`` distinct workers, as their readiness answers name them (new connections spread over them)."""
    seen: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while len(seen) < n and time.monotonic() < deadline:
        try:
            seen.add(ready_pid(url))
        except OSError:
            time.sleep(0.1)
    return seen


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
    first = worker_pids(url, 2)
    assert len(first) == 2 and os.getpid() not in first
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    assert all(predict_ok(url) for _ in range(10))  # the other worker keeps answering
    replaced = worker_pids(url, 2)
    assert len(replaced) == 2 and victim not in replaced and (replaced & first)


def test_a_stopped_server_finishes_the_request_it_is_receiving(two_workers):
    url = two_workers.url
    worker_pids(url, 2)
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
