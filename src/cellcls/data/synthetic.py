"""A procedural blood-smear data set: red cells with and without a ring-shaped parasite.

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
        blob = json.dumps({"v": RENDERER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    return u * u + v * v


def render_cell(rng: np.random.Generator, size: int, parasitized: bool) -> tuple[Image.Image, tuple[float, float, float] | None]:
    """One RGB cell image and, when parasitized, the parasite's (x, y, radius) in pixels."""
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

    target = None
    if parasitized:
        # a ring-form trophozoite: a thin dark-purple annulus with a chromatin dot, inside the cell
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
        img = img * (1 - alpha) + stain * alpha
        target = (float(px), float(py), float(r_ring))

    img = img + rng.normal(0, rng.uniform(2, 7), img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    blur = rng.uniform(0.0, 0.8)
    if blur > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    return pil, target


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
