"""A bounded load test of ``python -m cellcls.serve`` on 127.0.0.1: requests per second and latency percentiles at
several concurrencies, with and without Grad-CAM, and the server's memory over many requests.

    python scripts/loadtest.py checkpoint=<run folder, checkpoint or exported model> image=<an image file>
        [requests=1000] [concurrency=1,8,32] [cam=false,true] [memory_requests=10000] [memory_cam=true|false]
        [workers=1] [form=json|multipart|raw] [clients=<load-generator processes, 2>] [kill_worker=false|true]
        [output=docs/BENCHMARKS.md|none]

The server runs in its own process(es) (as users run it); each client thread keeps one HTTP/1.1 connection open and
sends one image per request, as the web page does (form=json), or as curl -F (multipart) or --data-binary (raw).
The client threads run in ``clients`` processes, so the load generator is not held to one core by the GIL; its own
CPU use is printed and tabled. kill_worker=true kills one worker (SIGKILL) halfway through each run and counts
the failed requests. Appends a row per setting to docs/BENCHMARKS.md (``output=``).
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
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OWN = ("checkpoint", "image", "requests", "concurrency", "cam", "memory_requests", "memory_cam", "output", "workers", "form",
       "clients", "kill_worker")


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


def start_server(checkpoint: str, workers: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "cellcls.serve", f"checkpoint={checkpoint}", "port=0", f"workers={workers}"],
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


def worker_pids(pid: int) -> list[int]:
    """The server's worker processes (its children), or the server itself when it runs alone."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.is_file() else []
    return [c for c in found if "spawn" in Path(f"/proc/{c}/cmdline").read_text()] or [pid]


def served_rss(pid: int) -> float:
    """Memory of the process(es) that hold a model: the workers, or the one server."""
    return sum(rss_mb(p) for p in worker_pids(pid))


def load_in_processes(port: int, body: bytes, headers: dict[str, str], requests: int, concurrency: int,
                      clients: int) -> dict[str, float]:
    """:func:`load` split over ``clients`` processes; their results pooled, and the CPU they used."""
    import multiprocessing as mp

    clients = max(1, min(clients, concurrency))
    share = [concurrency // clients + (i < concurrency % clients) for i in range(clients)]
    asked = [requests * s // concurrency for s in share]
    asked[0] += requests - sum(asked)
    started = time.perf_counter()
    with mp.get_context("fork").Pool(clients) as pool:
        parts = pool.starmap(load, [(port, body, dict(headers), n, c) for n, c in zip(asked, share)])
    wall = time.perf_counter() - started
    used = sum(p["cpu_s"] for p in parts) / wall
    ms = np.concatenate([p["latencies"] for p in parts]) * 1000
    return {"requests": len(ms), "req_per_s": len(ms) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "errors": sum(p["errors"] for p in parts), "client_cores": used}


def load(port: int, body: bytes, headers: dict[str, str], requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` POSTs over ``concurrency`` keep-alive connections; throughput, percentiles, errors."""
    path = f"/api/predict?cam={headers.pop('X-Cam', 'false')}"
    cpu = time.process_time()
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
                conn.request("POST", path, body, headers)
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
            "p95_ms": float(np.percentile(ms, 95)), "errors": errors, "latencies": ms / 1000,
            "cpu_s": time.process_time() - cpu}


def add_rows(output: Path, rows: list[str]) -> None:
    marker = "<!-- results:serve -->"
    text = output.read_text() if output.is_file() else ""
    if marker not in text:
        text += ("\n## Web server: throughput and latency under load\n\n"
                 "`scripts/loadtest.py` against `python -m cellcls.serve` on 127.0.0.1 (server and clients on the "
                 "same machine), one image per request as the web page sends, keep-alive connections.\n\n"
                 "| date | machine | model | cam | concurrency | requests | req/s | p50 ms | p95 ms | errors | server RSS "
                 "MB (start -> end) | command |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n" + marker + "\n")
    if "| workers |" not in text.split(marker)[0].rsplit("## ", 1)[-1]:  # rows from the worker-aware script
        text = text.replace(marker, "\n| date | machine | model | cam | workers | form | concurrency | requests | req/s | "
                            "p50 ms | p95 ms | errors | RSS MB per worker (start -> end) | load generator CPU (cores) | "
                            "command |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + marker)
    output.write_text(text.replace(marker, "\n".join(rows) + "\n" + marker))


def main(argv: Sequence[str]) -> int:
    own = parse(argv)
    image = Path(own["image"]).expanduser().read_bytes()
    requests = int(own.get("requests", 1000))
    levels = [int(c) for c in own.get("concurrency", "1,8,32").split(",")]
    cams = [v.lower() == "true" for v in own.get("cam", "false,true").split(",")]
    memory_requests = int(own.get("memory_requests", 0))
    workers, form, clients = int(own.get("workers", 1)), own.get("form", "json"), int(own.get("clients", 2))
    kill = own.get("kill_worker", "false").lower() == "true"
    proc, port = start_server(own["checkpoint"], workers)
    ready: set[int] = set()
    for _ in range(600):  # the workers load the model after the port is bound: wait until each has answered
        try:
            probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            probe.request("GET", "/ready")
            answer = probe.getresponse()
            if answer.status == 200:
                ready.add(json.loads(answer.read())["pid"])
            probe.close()
        except OSError:
            pass
        if len(ready) >= workers:
            break
        time.sleep(0.1)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/api/info")
    info = json.loads(conn.getresponse().read())
    conn.close()
    model = f"{info['model']} {info['input']['height']}x{info['input']['width']}x{info['input']['channels']}"
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = "python scripts/loadtest.py " + " ".join(argv)
    rows = []

    def body_for(cam: bool) -> tuple[bytes, dict[str, str]]:
        if form == "json":
            return (json.dumps({"images": [{"name": "cell.png", "data": base64.b64encode(image).decode()}], "cam": cam}).encode(),
                    {"Content-Type": "application/json"})
        if form == "raw":
            return image, {"Content-Type": "image/png", "X-Filename": "cell.png"}
        boundary = "cellclsloadtest"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cell.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def kill_one_later(seconds: float) -> threading.Timer:
        def kill_one() -> None:
            victims = [p for p in worker_pids(proc.pid) if p != proc.pid]
            if victims:
                os.kill(victims[0], 9)
                print(f"killed worker {victims[0]}", flush=True)
        timer = threading.Timer(seconds, kill_one)
        timer.start()
        return timer

    def measure(cam: bool, requests: int, concurrency: int, what: str) -> None:
        """One load run: printed, and a row for the table with the workers' memory before and after."""
        body, headers = body_for(cam)
        n = max(1, len(worker_pids(proc.pid)))
        before = served_rss(proc.pid) / n
        timer = kill_one_later(requests / max(load_rate[0], 1) / 2) if kill else None
        r = load_in_processes(port, body, {**headers, "X-Cam": str(cam).lower()}, requests, concurrency, clients)
        if timer:
            timer.cancel()
        after = served_rss(proc.pid) / max(1, len(worker_pids(proc.pid)))
        load_rate[0] = r["req_per_s"]
        print(f"{what} cam={cam} workers={workers} form={form} concurrency={concurrency}: {r['req_per_s']:.0f} req/s, "
              f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, {r['errors']} errors, RSS per worker "
              f"{before:.0f} -> {after:.0f} MB, load generator {r['client_cores']:.2f} cores", flush=True)
        rows.append(f"| {date} | {machine} | {model} | {cam} | {workers}{' (one killed)' if kill else ''} | {form} | "
                    f"{concurrency} | {r['requests']} | {r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                    f"{r['errors']} | {before:.0f} -> {after:.0f} | {r['client_cores']:.2f} | `{command}` |")

    load_rate = [500.0]
    try:
        for cam in cams:
            body, headers = body_for(cam)
            load(port, body, {**headers, "X-Cam": str(cam).lower()}, 50, 4)  # warm-up
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
