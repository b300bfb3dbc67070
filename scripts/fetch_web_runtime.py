"""Put npm's onnxruntime-web tarball (the version ``export format=web`` is pinned to, sha512-checked) in a folder,
without npm: ``python scripts/fetch_web_runtime.py [folder=.cache/npm]``. CI runs it so the browser tests find
the runtime without downloading anything themselves."""

from __future__ import annotations

import sys
from pathlib import Path

from cellcls.deploy.web_export import TARBALL, checked_tarball, fetch_tarball


def main(argv: list[str]) -> int:
    folder = Path(argv[0].removeprefix("folder=")) if argv else Path(__file__).resolve().parents[1] / ".cache" / "npm"
    have = folder / TARBALL
    if have.is_file():
        checked_tarball(have.read_bytes(), str(have))
        print(f"{have}: already here")
    else:
        print(f"{fetch_tarball(folder)}: downloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
