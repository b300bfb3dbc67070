"""What the training images looked like, kept with the model so that a new image far from them can be flagged.

Measured once per run on up to 1,000 evenly spaced training images: the range of their original sizes (from the
file headers), their Pillow modes, and the 1st-99th percentile of their mean intensity after decoding. Stored in the
checkpoint's preprocessing (``reference``) and the model card's input (``training_range``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellcls.data.cache import DecodedSplit
from cellcls.data.decode import decode_image, image_header
from cellcls.data.samples import Samples
from cellcls.data.normalization import sample_rows
from cellcls.data.preprocessing import Preprocessing
from cellcls.errors import DataError

# how far outside the training sizes an upload may be before it is worth a warning (a factor)
SIZE_SLACK = 2.0


def training_reference(train: Samples, decoded: DecodedSplit | None, prep: Preprocessing) -> dict[str, Any]:
    """Sizes, modes and the intensity range of (a sample of) the training split."""
    rows = sample_rows(len(train))
    widths, heights, modes = [], [], set()
    for i in rows:
        try:
            width, height, mode = image_header(train.paths[i])
        except DataError:
            continue
        widths.append(width)
        heights.append(height)
        modes.add(mode)
    if decoded is not None:
        pixels = np.load(decoded.file, mmap_mode="r")
        kept = [decoded.kept[i] for i in sample_rows(len(decoded.kept))]
        means = [float(pixels[r].mean()) / 255 for r in kept]
    else:
        means = []
        for i in rows:
            try:
                means.append(float(decode_image(train.paths[i], prep.channels, prep.image_size, window=prep.window).mean()) / 255)
            except DataError:
                continue
    if not means or not widths:
        return {}
    lo, hi = np.percentile(means, [1, 99])
    return {"width": [min(widths), max(widths)], "height": [min(heights), max(heights)], "modes": sorted(modes),
            "intensity": [round(float(lo), 4), round(float(hi), 4)]}


def unusual(reference: dict[str, Any], width: int, height: int, mode: str, image: np.ndarray) -> list[str]:
    """Why an image (original size and mode, decoded uint8 pixels) is far from the training images: [] if it is not."""
    if not reference:
        return []
    notes = []
    (w0, w1), (h0, h1) = reference["width"], reference["height"]
    if not (w0 / SIZE_SLACK <= width <= w1 * SIZE_SLACK and h0 / SIZE_SLACK <= height <= h1 * SIZE_SLACK):
        notes.append(f"its size {width}x{height} px is far from the training images' ({w0}-{w1} x {h0}-{h1} px)")
    grey = {"L", "I", "I;16", "I;16B", "I;16L", "F", "1"}
    # a kind is unusual only when training had none of it: Kermany's X-rays are mostly L with a few RGB files
    trained_kinds = {m in grey for m in reference["modes"]}
    if (mode in grey) not in trained_kinds:
        kind = "greyscale" if mode in grey else "colour"
        other = "colour" if mode in grey else "greyscale"
        notes.append(f"it is a {kind} image; the model was trained on {other} images")
    lo, hi = reference["intensity"]
    mean = float(np.asarray(image).mean()) / 255
    if not lo <= mean <= hi:
        notes.append(f"its mean brightness {mean:.2f} is outside the training range {lo:.2f}-{hi:.2f}")
    return notes
