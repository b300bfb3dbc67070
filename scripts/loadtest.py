"""A bounded load test of ``python -m cellcls.serve`` on 127.0.0.1: requests per second and latency percentiles at
several concurrencies, with and without Grad-CAM, and the server's memory over many requests.

    python scripts/loadtest.py checkpoint=<run folder, checkpoint or exported model> image=<an image file>
        [requests=1000] [concurrency=1,8,32] [cam=false,true] [memory_requests=10000] [memory_cam=true|false]
        [output=docs/BENCHMARKS.md|none]

The server runs in its own process (as users run it); each client thread keeps one HTTP/1.1 connection open and
sends one image per request, as the web page does. Appends a row per setting to docs/BENCHMARKS.md (``output=``).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OWN = ("checkpoint", "image", "requests", "concurrency", "cam", "memory_requests", "memory_cam", "output")


def parse(argv: Sequence[str]) -> dict[str, str]:
    own: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OWN:
            raise SystemExit(f"loadtest: expected one of {', '.join(f'{k}=...' for k in OWN)}, got {arg!r}")
        own[key] = value
    for key in ("checkpoint", "image"):
        if key not in own:
            raise SystemExit(f"loadtest: {key}= is required")
    return own


def start_server(checkpoint: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cellcls.serve", f"checkpoint={checkpoint}", "port=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, int(found.group(1))
    raise SystemExit(f"loadtest: the server did not start (exit code {proc.wait()})")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def load(port: int, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` POSTs over ``concurrency`` keep-alive connections; throughput, percentiles, errors."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine, bad = [], 0
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            start = time.perf_counter()
            try:
                conn.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and json.loads(payload)["results"][0]["ok"]
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            mine.append(time.perf_counter() - start)
            bad += not ok
        conn.close()
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "req_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "errors": errors}


def add_rows(output: Path, rows: list[str]) -> None:
    marker = "<!-- results:serve -->"
    text = output.read_text() if output.is_file() else ""
    if marker not in text:
        text += ("\n## Web server: throughput and latency under load\n\n"
                 "`scripts/loadtest.py` against `python -m cellcls.serve` on 127.0.0.1 (server and clients on the "
                 "same machine), one image per request as the web page sends, keep-alive connections.\n\n"
                 "| date | machine | model | cam | concurrency | requests | req/s | p50 ms | p95 ms | errors | server RSS "
                 "MB (start -> end) | command |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n" + marker + "\n")
    output.write_text(text.replace(marker, "\n".join(rows) + "\n" + marker))


def main(argv: Sequence[str]) -> int:
    own = parse(argv)
    image = Path(own["image"]).expanduser().read_bytes()
    requests = int(own.get("requests", 1000))
    levels = [int(c) for c in own.get("concurrency", "1,8,32").split(",")]
    cams = [v.lower() == "true" for v in own.get("cam", "false,true").split(",")]
    memory_requests = int(own.get("memory_requests", 0))
    proc, port = start_server(own["checkpoint"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/info")
    info = json.loads(conn.getresponse().read())
    conn.close()
    model = f"{info['model']} {info['input']['height']}x{info['input']['width']}x{info['input']['channels']}"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = "python scripts/loadtest.py " + " ".join(argv)
    rows = []

    def body_for(cam: bool) -> bytes:
        return json.dumps({"images": [{"name": "cell.png", "data": base64.b64encode(image).decode()}],
                           "cam": cam}).encode()

    def measure(cam: bool, requests: int, concurrency: int, what: str) -> None:
        """One load run: printed, and a row for the table with the server's memory before and after."""
        body = body_for(cam)
        before = rss_mb(proc.pid)
        r = load(port, body, requests, concurrency)
        after = rss_mb(proc.pid)
        print(f"{what} cam={cam} concurrency={concurrency}: {r['req_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
              f"p95 {r['p95_ms']:.1f} ms, {r['errors']} errors, RSS {before:.0f} -> {after:.0f} MB", flush=True)
        rows.append(f"| {date} | {machine} | {model} | {cam} | {concurrency} | {r['requests']} | {r['req_per_s']:.0f} | "
                    f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['errors']} | {before:.0f} -> {after:.0f} | "
                    f"`{command}` |")

    try:
        for cam in cams:
            load(port, body_for(cam), 50, 4)  # warm-up
            for c in levels:
                measure(cam, requests, c, "load:")
        if memory_requests:
            measure(own.get("memory_cam", "false").lower() == "true", memory_requests, 8, f"memory, {memory_requests} requests:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = own.get("output", str(REPO / "docs" / "BENCHMARKS.md"))
    if output != "none":
        add_rows(Path(output), rows)
        print(f"rows added to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
