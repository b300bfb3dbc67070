"""Human-readable summaries of a data set's splits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from cellcls.data.decode import image_header, max_pixels
from cellcls.data.samples import Samples
from cellcls.errors import DataError


def count_table(splits: Mapping[str, Samples], classes: list[str]) -> str:
    """Images per class per split with totals, as the skin-cancer tutorial prints them before training."""
    width = max(len(c) for c in [*classes, "total"]) + 2
    lines = ["split".ljust(7) + "".join(c.rjust(width) for c in [*classes, "total"])]
    if any(s.multilabel for s in splits.values()):
        lines[0] = lines[0].replace("total".rjust(width), "images".rjust(width)) + "   (images with each finding)"
    for name, samples in splits.items():
        if samples.targets is not None:
            row = [sum(1 for t in samples.targets if t[k] == 1.0) for k in range(len(classes))]
            lines.append(name.ljust(7) + "".join(str(n).rjust(width) for n in [*row, len(samples)]))
            continue
        counts = Counter(samples.labels)
        row = [counts[i] for i in range(len(classes))]
        lines.append(name.ljust(7) + "".join(str(n).rjust(width) for n in [*row, sum(row)]))
    return "\n".join(lines)


def image_properties(samples: Samples) -> dict[str, object]:
    """Size range and Pillow modes from the file headers (no full decode), and unreadable headers."""
    widths, heights, modes, unreadable, too_large = [], [], Counter(), [], []
    limit = max_pixels()
    for path in samples.paths:
        try:
            width, height, mode = image_header(path)
        except DataError as exc:
            (too_large if "decompression bomb" in str(exc) else unreadable).append(path)
            continue
        widths.append(width)
        heights.append(height)
        modes[mode] += 1
        if width * height > limit:
            too_large.append(path)
    return {
        "width": (min(widths), max(widths)) if widths else None,
        "height": (min(heights), max(heights)) if heights else None,
        "modes": dict(modes),
        "unreadable": unreadable,
        "too_large": too_large,  # over the pixel limit: skipped when a run decodes them
    }
