"""A procedural blood-smear data set: red cells with and without a ring-shaped parasite; with
``render.multilabel=true``, cells carrying any of three marks (ring, stippling, target), listed in a table.

The images are real PNG files in class folders (``train/<class>/``, ``test/<class>/``), so they travel the
same loading code as a real download. Rendering is seeded and cached: the folder is keyed by a hash of the
settings and written atomically, so concurrent runs and changed settings are both safe.
``annotations.csv`` records each parasite's centre and radius (for localisation checks such as Grad-CAM).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cellcls.config.schema import RenderConfig
from cellcls.errors import writing
from cellcls.paths import build_once, cache_dir

RENDERER_VERSION = 1
CLASSES = ("uninfected", "parasitized")


@dataclass
class SyntheticSpec(RenderConfig):
    """What to render (the ``dataset.render`` settings); any change gives a new cache folder."""

    def key(self) -> str:
        settings = asdict(self)
        if not settings["multilabel"]:  # the two-class set keeps the key it had before multi-label rendering
            del settings["multilabel"]
        blob = json.dumps({"v": RENDERER_VERSION, **settings}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    return u * u + v * v


def _cell(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A stained field with one red cell and platelet-like distractors; the cell's (cy, cx, ry, rx)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # background: pale stained field with a soft gradient
    bg = np.array([235, 222, 230], np.float32) + rng.normal(0, 8, 3)
    grad = (xx / size - 0.5) * rng.normal(0, 12) + (yy / size - 0.5) * rng.normal(0, 12)
    img = np.broadcast_to(bg, (size, size, 3)) + grad[..., None]

    # the red cell: an ellipse with a darker rim and a pale centre
    cy, cx = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    ry, rx = rng.uniform(0.28, 0.40, 2) * size
    d = _ellipse_mask(yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
    cell_colour = np.array([205, 120, 135], np.float32) + rng.normal(0, 12, 3)
    inside = np.clip((1.0 - d) * 6.0, 0, 1)[..., None]
    pallor = np.exp(-d / 0.18)[..., None] * rng.uniform(15, 40)
    rim = np.exp(-((np.sqrt(d) - 1.0) ** 2) / 0.01)[..., None] * rng.uniform(10, 30)
    img = img * (1 - inside) + (cell_colour + pallor) * inside - rim

    # distractors on both classes: solid platelet-like blobs outside the cell (not rings)
    for _ in range(rng.poisson(0.8)):
        by, bx = rng.uniform(0.05, 0.95, 2) * size
        if _ellipse_mask(np.array(by), np.array(bx), cy, cx, ry, rx, 0.0) < 1.3:
            continue
        blob = np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (rng.uniform(0.02, 0.04) * size) ** 2))[..., None]
        img = img * (1 - blob) + np.array([150, 90, 160], np.float32) * blob
    return img, (float(cy), float(cx), float(ry), float(rx))


def _ring(img: np.ndarray, rng: np.random.Generator, cell: tuple[float, float, float, float],
          ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A ring-form trophozoite: a thin dark-purple annulus with a chromatin dot, inside the cell; its (x, y, r)."""
    size = img.shape[0]
    cy, cx, ry, rx = cell
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r_ring = rng.uniform(0.07, 0.11) * size
    ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
    py, px = cy + np.sin(ang) * rad * (ry - r_ring), cx + np.cos(ang) * rad * (rx - r_ring)
    dist = np.sqrt((yy - py) ** 2 + (xx - px) ** 2)
    width = rng.uniform(0.9, 1.5)
    ring = np.exp(-((dist - r_ring) ** 2) / (2 * width**2))[..., None]
    dot_a = rng.uniform(0, 2 * np.pi)
    dy, dx = py + np.sin(dot_a) * r_ring, px + np.cos(dot_a) * r_ring
    dot = np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * 1.3**2))[..., None]
    stain = np.array([95, 40, 125], np.float32) + rng.normal(0, 10, 3)
    alpha = np.clip(ring * rng.uniform(0.75, 0.95) + dot, 0, 1)
    return img * (1 - alpha) + stain * alpha, (float(px), float(py), float(r_ring))


def _stipple(img: np.ndarray, rng: np.random.Generator, cell: tuple[float, float, float, float]) -> np.ndarray:
    """Basophilic stippling: a dozen or more fine blue-grey dots scattered over the cell."""
    size = img.shape[0]
    cy, cx, ry, rx = cell
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    alpha = np.zeros((size, size, 1), np.float32)
    for _ in range(int(rng.integers(12, 22))):
        a, r = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.7))
        py, px = cy + np.sin(a) * r * ry, cx + np.cos(a) * r * rx
        alpha += np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * 0.8**2))[..., None]
    return img * (1 - np.clip(alpha, 0, 0.9)) + np.array([70, 80, 140], np.float32) * np.clip(alpha, 0, 0.9)


def _target(img: np.ndarray, rng: np.random.Generator, cell: tuple[float, float, float, float]) -> np.ndarray:
    """A target cell: a dense, darker disc in the middle of the central pallor."""
    size = img.shape[0]
    cy, cx, ry, rx = cell
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.3, 0.4) * min(ry, rx)
    disc = np.clip((r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)) / 1.5, 0, 1)[..., None]
    colour = np.array([140, 50, 80], np.float32) + rng.normal(0, 8, 3)
    return img * (1 - disc * 0.85) + colour * disc * 0.85


def _finish(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 0.8)
    if blur > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    return pil


def render_cell(rng: np.random.Generator, size: int, parasitized: bool) -> tuple[Image.Image, tuple[float, float, float] | None]:
    """One RGB cell image and, when parasitized, the parasite's (x, y, radius) in pixels."""
    img, cell = _cell(rng, size)
    target = None
    if parasitized:
        img, target = _ring(img, rng, cell)
    return _finish(img, rng), target


FINDINGS = ("ring", "stippling", "target")  # the multi-label set's marks, each present independently
MARKS = {"stippling": _stipple, "target": _target}


def render_marked_cell(rng: np.random.Generator, size: int, marks: set[str]) -> Image.Image:
    """One cell carrying any of :data:`FINDINGS` (none, one or several)."""
    img, cell = _cell(rng, size)
    if "ring" in marks:
        img, _ = _ring(img, rng, cell)
    for name, draw in MARKS.items():
        if name in marks:
            img = draw(img, rng, cell)
    return _finish(img, rng)


def _render_findings(root: Path, spec: SyntheticSpec) -> None:
    """The multi-label set: ``images/<split>/*.png`` and ``labels.csv`` in the ChestX-ray14 form (``Image Index``,
    ``Finding Labels`` joined by ``|``, ``No Finding``, ``split``); each finding present with probability 0.4."""
    rows = []
    for split, count in (("train", 2 * spec.train_per_class), ("test", 2 * spec.test_per_class)):
        folder = root / "images" / split
        folder.mkdir(parents=True)
        rng = np.random.default_rng([spec.seed, 7, 0 if split == "train" else 1])
        for i in range(count):
            marks = {f for f in FINDINGS if rng.uniform() < 0.4}
            rel = f"images/{split}/cell_{i:05d}.png"
            with writing(root / rel):
                render_marked_cell(rng, spec.size, marks).save(root / rel)
            rows.append([rel, "|".join(f for f in FINDINGS if f in marks) or "No Finding", split])
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "split"])
        writer.writerows(rows)


def _render_split(root: Path, split: str, per_class: int, spec: SyntheticSpec, rows: list[list[str]]) -> None:
    for label, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        # one child seed per (split, class): adding images to one split never changes another
        rng = np.random.default_rng([spec.seed, label, 0 if split == "train" else 1])
        for i in range(per_class):
            image, target = render_cell(rng, spec.size, parasitized=label == 1)
            rel = f"{split}/{name}/{name}_{i:05d}.png"
            with writing(root / rel):
                image.save(root / rel)
            rows.append([rel, name] + ([f"{v:.2f}" for v in target] if target else ["", "", ""]))


def ensure_synthetic(spec: SyntheticSpec, base: Path | None = None) -> Path:
    """Render the data set for ``spec`` once and return its root; later calls return the cached folder."""
    base = (base or cache_dir()) / "synthetic"
    root = base / f"{spec.key()}-{spec.size}px"

    def fill(folder: Path) -> None:
        if spec.multilabel:
            _render_findings(folder, spec)
            (folder / "spec.json").write_text(json.dumps({"renderer_version": RENDERER_VERSION, **asdict(spec)}))
            return
        rows: list[list[str]] = []
        _render_split(folder, "train", spec.train_per_class, spec, rows)
        _render_split(folder, "test", spec.test_per_class, spec, rows)
        with open(folder / "annotations.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "class", "parasite_x", "parasite_y", "parasite_radius"])
            writer.writerows(rows)
        # spec.json is written last: its presence marks a complete render
        (folder / "spec.json").write_text(json.dumps({"renderer_version": RENDERER_VERSION, **asdict(spec)}, indent=2))

    return build_once(root, "spec.json", fill)
