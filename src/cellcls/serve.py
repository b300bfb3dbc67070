"""``python -m cellcls.serve checkpoint=<checkpoint, run folder or exported model> [host=127.0.0.1] [port=8000]``

A local web app: upload cell or X-ray images and see, for each, the predicted class, a probability bar per class
and the Grad-CAM overlay (checkpoints only: an exported model has no gradients), beside the model's name, classes,
input size and validation metrics. Scripts use the same JSON API the page uses:

    GET  /api/info      the model card and the upload limits
    POST /api/predict   {"images": [{"name": "cell.png", "data": "<base64 of the file>"}], "cam": true}
                        or multipart/form-data file fields (curl -F file=@cell.png)
                        or the image itself (curl --data-binary @cell.png -H 'Content-Type: image/png')
                        -> {"results": [{"name", "ok", "label", "confidence", "probabilities": {class: p},
                                         "cam_png": "<base64 PNG>" or null, "error": null or "why"}]}
    GET  /health        {"status": "ok"} (liveness)
    GET  /ready         200 {"status": "ready"} once the model answers, else 503 (readiness)

Uploads are decoded in memory and never written to disk. Other settings: device=auto|cpu|cuda,
max_image_mb=<per file, default 10>, max_pixels=<width x height, default 50000000>, max_images=<per request,
default 8>, cam_layer=<layer name>, header_timeout_s=<10>, body_timeout_s=<30>, keep_alive_s=<5>,
max_batch=<images per forward pass, 32>, uncertain_margin=<0.2: a top class less than this ahead of the next is
shown as uncertain>. It binds to 127.0.0.1 unless host= says otherwise. The body limit follows from
max_images x max_image_mb (base64 adds a third); headers must arrive within 10 s and the body within 30 s (408),
idle connections close after 5 s, a POST in none of the three forms gets 415. Concurrent requests share forward
passes (micro-batching, up to 32 images per pass), so throughput grows with the number of clients.

workers=<n> (default: this machine's cores) runs n server processes on one port, each with the model loaded once
and its own micro-batcher; a worker that dies is replaced, and SIGTERM or Ctrl+C lets in-flight requests finish
(up to model_timeout_s). client_side=true serves the page of ``export format=web`` instead: the browser gets the
model and classifies the images itself (runtime= as for that export).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace

from cellcls.cli import as_bool, command_args, fail, own_settings, whole_number
from cellcls.deploy.workers import ServeSettings, build, web_folder
from cellcls.errors import ConfigError

LIMITS = {"max_image_mb": float, "max_pixels": int, "max_images": int, "header_timeout_s": float, "body_timeout_s": float,
          "keep_alive_s": float, "max_batch": int, "uncertain_margin": float, "model_timeout_s": float}  # Limits fields
SETTINGS = ("checkpoint", "host", "port", "device", "cam_layer", "workers", "client_side", "runtime", *LIMITS)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _check_port_free(host: str, port: int) -> None:
    """Refuse, by name, a port another program listens on (before the model loads; uvicorn would say it in its own
    words and exit 3)."""
    import errno
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"host={host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port={port} on {host} is in use by another program (another cellcls.serve?); "
                                  "choose another port, or port=0 for a free one") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args, done = command_args(argv, __doc__)
    if done is not None:
        return done
    try:
        own = own_settings(args, SETTINGS, "serve", required=("checkpoint",))
        limits = {k: kind(float(own[k])) for k, kind in LIMITS.items() if k in own}
        bad = [k for k, v in limits.items() if v <= 0]
        if bad:
            raise ConfigError(f"{', '.join(bad)} must be positive")
        host, port = own.get("host", "127.0.0.1"), whole_number("port", own.get("port", 8000), 0)
        if port > 65535:
            raise ConfigError(f"port={port} is not a TCP port: give 1-65535, or port=0 for a free one")
        workers = whole_number("workers", own.get("workers", len(os.sched_getaffinity(0))), 1)
        _check_port_free(host, port)
        settings = ServeSettings(own["checkpoint"], own.get("device", "auto"), own.get("cam_layer"), limits)
        # the model is loaded here first, so a bad checkpoint is refused once, and not by every worker
        app, classifier = build(settings)
        if as_bool("client_side", own.get("client_side", "false")):
            settings = settings.with_folder(web_folder(classifier.predictor, own.get("runtime")))
            app, classifier = build(settings, classifier.predictor)
        elif "runtime" in own:
            raise ConfigError("runtime= is the browser runtime of client_side=true only")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return fail(exc)
    except ImportError as exc:
        return fail(ImportError(f"serve needs FastAPI and uvicorn: pip install 'cellcls[deploy]' ({exc})"))
    import uvicorn

    from cellcls.deploy.protocol import with_header_timeout

    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the app (no authentication)",
              file=sys.stderr)
    card = classifier.predictor.card
    print(f"cellcls: serving {card['model']} ({', '.join(card['classes'])}) from {classifier.predictor.path}"
          f"{f' in {workers} worker processes' if workers > 1 else ''}"
          f"{'; the page classifies in the browser' if settings.client_folder else ''}", flush=True)
    lim = classifier.limits
    if workers > 1:
        settings = replace(settings, threads=max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ.update(settings.environment())  # what each worker process builds its app from
    common = dict(host=host, port=port, log_level="warning",
                  timeout_keep_alive=max(1, round(lim.keep_alive_s)), timeout_graceful_shutdown=max(1, round(lim.model_timeout_s)))
    url_host = f"[{host}]" if ":" in host else host
    if workers > 1:
        del app, classifier  # the workers load their own copies
        # the supervisor kills a worker that misses its 5 s health ping; one importing PyTorch on a busy machine can
        config = uvicorn.Config("cellcls.deploy.workers:create_app_from_env", factory=True, workers=workers,
                                http="cellcls.deploy.workers:WorkerProtocol", timeout_worker_healthcheck=30, **common)
        from uvicorn.supervisors import Multiprocess

        sock = config.bind_socket()
        print(f"cellcls: open http://{url_host}:{sock.getsockname()[1]}/ (JSON API at /api/predict, schema at /docs; "
              "Ctrl+C stops)", flush=True)
        Multiprocess(config, sockets=[sock]).run()
        return 0
    config = uvicorn.Config(app, http=with_header_timeout(lim.header_timeout_s), **common)
    server = uvicorn.Server(config)

    # uvicorn binds inside run(); print the address (the real port for port=0) once it listens, for people and scripts
    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            print(f"cellcls: open http://{url_host}:{bound}/ (JSON API at /api/predict, schema at /docs; Ctrl+C stops)",
                  flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
