"""``format=web``: a static folder that classifies images inside the browser, so no image leaves the user's machine.

The folder holds the page (``index.html`` in client mode and ``local.js``, which repeats cellcls's decoding, resize
and decision rule), ``model.onnx`` (the ONNX export: normalisation, network and out-of-distribution score inside),
``card.json`` (classes, input recipe, operating point, prediction-set threshold, limits) and ``ort/``: the
onnxruntime-web runtime (its JavaScript, the WebAssembly build and its licence). No file comes from another origin.

The runtime is not inside cellcls's wheel (15 MB of WebAssembly that only this command needs, and a copy would go
stale): it is npm's own package, pinned to one version and checked against the sha512 that npm publishes for it.
It is read from ``runtime=`` (the ``.tgz`` that ``npm pack onnxruntime-web@<version>`` writes, or an unpacked
package folder such as ``node_modules/onnxruntime-web``), else from cellcls's cache, else downloaded once from the
npm registry (``$npm_config_registry``, as npm itself reads it) into the cache. No npm or Node is needed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

from cellcls.data.reference import SIZE_SLACK
from cellcls.deploy.export import export_card, export_model
from cellcls.deploy.predict import OUTSIDE
from cellcls.deploy.runtimes import card_path
from cellcls.deploy.server import Limits, shown_path
from cellcls.errors import ConfigError
from cellcls.infra.run_folder import atomic_write
from cellcls.paths import cache_dir

ORT_WEB = "onnxruntime-web"
ORT_WEB_VERSION = "1.31.1"
ORT_WEB_INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
# the WebAssembly build without WebGPU/WebGL: the plain CPU backend, which runs every operator of the export
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
RUNTIME_DIR = "ort"
MODEL_FILE, CARD_FILE, PAGE, SCRIPT = "model.onnx", "card.json", "index.html", "local.js"
CLIENT_SCRIPTS = "<!-- cellcls:client-scripts -->"
TARBALL = f"{ORT_WEB}-{ORT_WEB_VERSION}.tgz"


def registry_url() -> str:
    """Where the runtime's tarball is downloaded from: ``$npm_config_registry`` or npm's public registry."""
    base = os.environ.get("npm_config_registry") or "https://registry.npmjs.org/"
    return f"{base.rstrip('/')}/{ORT_WEB}/-/{TARBALL}"


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def checked_tarball(data: bytes, origin: str) -> bytes:
    if _integrity(data) != ORT_WEB_INTEGRITY:
        raise ConfigError(f"{origin} is not npm's {ORT_WEB} {ORT_WEB_VERSION} package (its sha512 differs from the one "
                          f"npm publishes); get it with: npm pack {ORT_WEB}@{ORT_WEB_VERSION}")
    return data


def _download() -> bytes:
    url = registry_url()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        raise ConfigError(f"cannot download the browser runtime from {url} ({exc}); on a machine without internet run "
                          f"`npm pack {ORT_WEB}@{ORT_WEB_VERSION}` elsewhere and pass runtime=<that .tgz>") from None
    return checked_tarball(data, url)


def _from_tarball(data: bytes, origin: str) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = {m.name: m for m in tar.getmembers() if m.isfile()}
        missing = [f for f in RUNTIME_FILES if f"package/dist/{f}" not in names]
        if missing:
            raise ConfigError(f"{origin} lacks {', '.join(missing)} under package/dist/")
        return {f: tar.extractfile(names[f"package/dist/{f}"]).read() for f in RUNTIME_FILES}  # type: ignore[union-attr]


def _from_folder(folder: Path) -> dict[str, bytes]:
    manifest = folder / "package.json"
    if not manifest.is_file():
        raise ConfigError(f"runtime={folder}: not an npm package folder (no package.json); give the {ORT_WEB} folder "
                          f"(node_modules/{ORT_WEB}) or the .tgz of npm pack {ORT_WEB}@{ORT_WEB_VERSION}")
    meta = json.loads(manifest.read_text())
    if meta.get("name") != ORT_WEB or meta.get("version") != ORT_WEB_VERSION:
        raise ConfigError(f"runtime={folder} holds {meta.get('name')} {meta.get('version')}; cellcls's page is built and "
                          f"tested for {ORT_WEB} {ORT_WEB_VERSION} (npm install {ORT_WEB}@{ORT_WEB_VERSION})")
    missing = [f for f in RUNTIME_FILES if not (folder / "dist" / f).is_file()]
    if missing:
        raise ConfigError(f"runtime={folder} lacks dist/{', dist/'.join(missing)}")
    return {f: (folder / "dist" / f).read_bytes() for f in RUNTIME_FILES}


def runtime_files(source: str | Path | None = None) -> dict[str, bytes]:
    """The onnxruntime-web files the page needs: from ``source`` (a ``.tgz`` or a package folder), else the cache,
    else the npm registry (then cached). Every tarball is checked against the pinned sha512."""
    if source is not None:
        path = Path(source).expanduser()
        if path.is_dir():
            return _from_folder(path)
        if not path.is_file():
            raise ConfigError(f"runtime={source}: no such file or folder (the .tgz of npm pack {ORT_WEB}@{ORT_WEB_VERSION}, "
                              f"or node_modules/{ORT_WEB})")
        return _from_tarball(checked_tarball(path.read_bytes(), f"runtime={source}"), str(path))
    cached = cache_dir() / "npm" / TARBALL
    if cached.is_file():
        return _from_tarball(checked_tarball(cached.read_bytes(), str(cached)), str(cached))
    fetch_tarball(cached.parent)
    return _from_tarball(cached.read_bytes(), str(cached))


def fetch_tarball(folder: Path) -> Path:
    """Download the pinned tarball from the npm registry into ``folder`` (checked before it is written)."""
    return atomic_write(Path(folder) / TARBALL, _download())


def web_card(card: dict[str, Any]) -> dict[str, Any]:
    """The export's model card plus what the page needs to act like the server: its limits and messages."""
    limits = Limits()
    return {**card, "exported_as": "web", "checkpoint": shown_path(card.get("checkpoint")),
            "limits": {k: getattr(limits, k) for k in ("max_image_mb", "max_pixels", "max_batch", "uncertain_margin")},
            "web": {"size_slack": SIZE_SLACK, "outside": OUTSIDE, "runtime": f"{ORT_WEB} {ORT_WEB_VERSION}"},
            "gradcam": False}


def write_page(folder: Path, card: dict[str, Any], runtime: dict[str, bytes]) -> None:
    """The page, its script, the card and the runtime into ``folder`` (which holds ``model.onnx`` already)."""
    web = resources.files("cellcls.deploy.web")
    page = web.joinpath(PAGE).read_text(encoding="utf-8")
    scripts = f'<script src="{RUNTIME_DIR}/{RUNTIME_FILES[0]}"></script>\n<script src="{SCRIPT}"></script>'
    page = page.replace('data-mode="server"', 'data-mode="client"', 1).replace(CLIENT_SCRIPTS, scripts, 1)
    (folder / PAGE).write_text(page, encoding="utf-8")
    (folder / SCRIPT).write_text(web.joinpath(SCRIPT).read_text(encoding="utf-8"), encoding="utf-8")
    (folder / CARD_FILE).write_text(json.dumps(web_card(card), indent=2), encoding="utf-8")
    ort = folder / RUNTIME_DIR
    ort.mkdir()
    for name, data in runtime.items():
        (ort / name).write_bytes(data)
    (ort / "LICENSE").write_text(web.joinpath("ONNXRUNTIME-LICENSE.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (ort / "SOURCE.txt").write_text(f"npm package {ORT_WEB} {ORT_WEB_VERSION}, files dist/{', dist/'.join(RUNTIME_FILES)}\n"
                                    f"integrity {ORT_WEB_INTEGRITY}\nlicence MIT (LICENSE)\n", encoding="utf-8")


def check_output(output: Path) -> None:
    """Refuse to replace anything but an earlier web export (or an empty folder)."""
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / CARD_FILE).is_file())):
        raise ConfigError(f"output={output} exists and is not an earlier web export; choose an empty or new folder")


def _replace_folder(output: Path, fill: Any) -> Path:
    """Build the folder beside ``output`` and swap it in, so a failure leaves an earlier export whole."""
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the folder from the web server's user
    try:
        fill(tmp)
        old = output.with_name(f".{output.name}.old")
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def export_web(loaded: Any, output: Path, runtime: str | Path | None = None, opset: int = 18,
               model: Path | None = None) -> Path:
    """Write the static folder for ``loaded`` (a :class:`cellcls.models.trained.LoadedModel`) to ``output``; with
    ``model``, that ONNX file (an int8 copy) and its card instead of a fresh export."""
    check_output(output)
    files = runtime_files(runtime)  # a missing runtime fails before any export work

    def fill(folder: Path) -> None:
        if model is None:
            export_model(loaded, "onnx", folder / MODEL_FILE, opset=opset)
            card = export_card(loaded, "onnx")
        else:
            shutil.copyfile(model, folder / MODEL_FILE)
            card = json.loads(card_path(model).read_text())
        write_page(folder, card, files)

    return _replace_folder(output, fill)


def web_folder_of_exported(model: Path, card: dict[str, Any], output: Path, runtime: str | Path | None = None) -> Path:
    """The same folder around an ONNX file exported earlier (``serve client_side=true`` on an exported model)."""
    if model.suffix.lower() != ".onnx":
        raise ConfigError(f"client_side=true needs a checkpoint or an ONNX export; {model.name} is TorchScript")
    check_output(output)
    files = runtime_files(runtime)

    def fill(folder: Path) -> None:
        shutil.copyfile(model, folder / MODEL_FILE)
        write_page(folder, card, files)

    return _replace_folder(output, fill)
