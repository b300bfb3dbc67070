"""How fast the duplicate audit is and how well it recovers known copies, at scale.

    python scripts/audit_benchmark.py [images=30000] [data=../shared/data] [work=/tmp/cellcls-audit-bench]
        [output=docs/BENCHMARKS.md|none]

Builds a data set of ``images`` files from the real subsets in ``data`` (their MANIFEST.csv): every real image
once, plus copies of random ones, each flipped, rotated by any angle (black fill, as the blood-cell set), shifted,
cropped, resized and re-encoded as JPEG. The truth: a copy belongs with its source, and blood-cell images with
every other image of their original smear photo. Then it times each stage of
:func:`cellcls.data.duplicates.find_duplicates` and reports the clusters' pairwise precision and recall, appending a
row to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageOps
from sklearn.metrics.cluster import pair_confusion_matrix

REPO = Path(__file__).resolve().parents[1]
OWN = ("images", "data", "work", "output")


def copy_of(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random mix of the transformations public data sets hold."""
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.rotate(rng.uniform(0, 360), fillcolor=(0, 0, 0))
    w, h = image.size
    dx, dy = rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.1, 0.1) * h
    image = image.transform(image.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        c = rng.uniform(0, 0.1)
        image = image.crop((int(c * w), int(c * h), w - int(c * w), h - int(c * h)))
    scale = rng.uniform(0.6, 1.2)
    return image.resize((max(16, int(image.width * scale)), max(16, int(image.height * scale))))


def build(data: Path, work: Path, n: int, seed: int = 0) -> tuple[list[Path], list[str]]:
    """Write the benchmark data set (or reuse it) and return its files and their true groups."""
    with open(data / "MANIFEST.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sources = [(data / r["file"], f"{r['dataset']}:{r['group']}" if r["dataset"] == "blood_cells" else r["file"])
               for r in rows]
    listing = work / "truth.csv"
    if listing.is_file():
        with open(listing, newline="") as fh:
            kept = list(csv.DictReader(fh))
        if len(kept) == n:
            return [Path(r["file"]) for r in kept], [r["group"] for r in kept]
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files, groups = [], []
    for i in range(n):
        path, group = sources[i] if i < len(sources) else rng.choice(sources)
        out = work / f"{i:06d}.jpg"
        with Image.open(path) as im:
            image = im.convert("RGB")
        (image if i < len(sources) else copy_of(image, rng)).save(out, quality=rng.randint(60, 95))
        files.append(out)
        groups.append(group)
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "group"])
        writer.writerows(zip(map(str, files), groups))
    return files, groups


def main(argv: list[str]) -> int:
    own = dict(a.split("=", 1) for a in argv)
    unknown = set(own) - set(OWN)
    if unknown:
        raise SystemExit(f"audit_benchmark: unknown setting(s) {sorted(unknown)}; settings: {', '.join(OWN)}")
    n = int(own.get("images", 30_000))
    data = Path(own.get("data", REPO.parent / "shared" / "data"))
    work = Path(own.get("work", "/tmp/cellcls-audit-bench")) / str(n)
    files, truth = build(data, work, n)

    from cellcls.config.schema import DuplicatesConfig
    from cellcls.data import duplicates as dup

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    found = dup.find_duplicates(files, DuplicatesConfig(), progress=True, timings=times)  # as the audit runs it
    times["audit"] = time.perf_counter() - t0
    (_, false_join), (false_split, together) = pair_confusion_matrix(truth, found.cluster) // 2
    precision, recall = together / (together + false_join), together / (together + false_split)
    cores = os.cpu_count()
    line = (f"| {datetime.now(timezone.utc):%Y-%m-%d} | {n:,} images (real subsets + transformed copies) | "
            f"{platform.machine()}, {cores} cores, no GPU | {times['audit']:.0f} s "
            f"({1000 * times['audit'] / n:.1f} ms/image: fingerprints {times['fingerprints']:.0f} s, vocabulary and "
            f"candidates {times['candidates']:.0f} s, {int(times['checked']):,} checks {times['checks']:.0f} s) | "
            f"precision {precision:.3f}, "
            f"recall {recall:.3f} | `python scripts/audit_benchmark.py images={n}` |")
    print(line)
    target = own.get("output", str(REPO / "docs" / "BENCHMARKS.md"))
    if target != "none":
        doc = Path(target)
        text = doc.read_text()
        marker = "<!-- results:audit -->"
        doc.write_text(text.replace(marker, f"{line}\n{marker}") if marker in text else text + "\n" + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
