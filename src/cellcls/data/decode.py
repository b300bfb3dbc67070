"""Decoding one image file into the model's uint8 pixels (Pillow and NumPy only: cheap to import in a worker)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cellcls.data.dicom import dicom_header, is_dicom, read_dicom
from cellcls.errors import ConfigError, DataError

# The one pixel limit for every image cellcls reads (training, evaluate, predict, inspect, the web app): larger
# files are refused before their pixels are decoded. 50 megapixels holds any X-ray; CELLCLS_MAX_PIXELS changes it.
DEFAULT_MAX_PIXELS = 50_000_000


def max_pixels() -> int:
    """The pixel limit: ``$CELLCLS_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    value = os.environ.get("CELLCLS_MAX_PIXELS", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"CELLCLS_MAX_PIXELS={value!r} must be a whole number of pixels >= 1")
    return int(value)


def decode_image(
    source: Path | BinaryIO, channels: int, size: Sequence[int], name: str | None = None, limit: int | None = None,
    window: Sequence[float] | None = None,
) -> np.ndarray:
    """Decode a file (or an open binary stream) to a ``channels x H x W`` uint8 array: EXIF orientation applied,
    any Pillow mode converted to L or RGB, resized with antialiasing to ``size`` (height, width).

    Images over ``limit`` pixels (default :func:`max_pixels`) are refused before their pixels are decoded
    (decompression bombs, and no 144-megapixel scan is worth decoding for a 128-pixel model); ``name`` is what
    error messages call a stream; ``window`` (centre, width) replaces a DICOM file's own window.
    """
    def resize(im: Image.Image) -> Image.Image:
        return im.resize((int(size[1]), int(size[0])), Image.Resampling.BILINEAR, reducing_gap=None)

    im = read_image(source, channels, name, limit, resize, window)
    return np.asarray(im).reshape(im.height, im.width, -1).transpose(2, 0, 1).copy()  # writable, C order


def read_image(
    source: Path | BinaryIO,
    channels: int,
    name: str | None = None,
    limit: int | None = None,
    then: Callable[[Image.Image], Image.Image] | None = None,
    window: Sequence[float] | None = None,
) -> Image.Image:
    """Open an image the way :func:`decode_image` does (pixel limit, EXIF orientation, L or RGB) and apply ``then``
    (a resize) while the file is open; any failure is a :class:`DataError` naming the file."""
    label = name or str(source)
    limit = max_pixels() if limit is None else limit
    if is_dicom(source):
        im = read_dicom(source, label, limit, window)
        mode = "RGB" if channels == 3 else "L"
        im = im if im.mode == mode else im.convert(mode)
        return then(im) if then is not None else im
    try:
        with Image.open(source) as im:
            if im.width * im.height > limit:
                raise DataError(f"{label}: {im.width}x{im.height} pixels is over the limit of {limit:,} pixels "
                                "(CELLCLS_MAX_PIXELS)")
            im = ImageOps.exif_transpose(im) if _has_orientation(im) else im
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16/32-bit greyscale (X-rays): Pillow's convert("L") would clip, so rescale the range instead
                im = _to_l(im)
            mode = "RGB" if channels == 3 else "L"
            im = im if im.mode == mode else im.convert(mode)
            im = then(im) if then is not None else im
            im.load()
            return im
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        raise DataError(f"cannot decode image {label}: not an image file Pillow can read (PNG, JPEG, TIFF, BMP, ...)") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"{label}: refused as a possible decompression bomb ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {label}: {exc}") from exc


def image_header(source: Path | BinaryIO, name: str | None = None) -> tuple[int, int, str]:
    """Width, height and mode (Pillow's, or ``DICOM <photometric interpretation>``) without decoding the pixels;
    :class:`DataError` when the header cannot be read."""
    label = name or str(source)
    if is_dicom(source):
        return dicom_header(source, label)
    try:
        with Image.open(source) as im:
            return im.width, im.height, im.mode
    except Image.DecompressionBombError as exc:
        raise DataError(f"{label}: refused as a possible decompression bomb ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read the header of image {label}: {exc}") from exc


def _has_orientation(im: Image.Image) -> bool:
    """Whether the image carries an EXIF orientation other than 'normal'. A PNG is asked only when its EXIF chunk
    came before the pixels: otherwise Pillow would decode the whole file just to look for one at the end."""
    if im.format in ("JPEG", "MPO", "TIFF", "WEBP") or "exif" in im.info:
        return im.getexif().get(0x0112, 1) != 1
    return False


def _to_l(im: Image.Image) -> Image.Image:
    """High-bit-depth greyscale to 8-bit L, scaling the full range of the image."""
    arr = np.asarray(im, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(scaled.astype(np.uint8))


def decode_rows(
    file: str, jobs: Sequence[tuple[int, str]], channels: int, size: Sequence[int], window: Sequence[float] | None = None
) -> list[tuple[int, str | None]]:
    """Decode ``(row, path)`` jobs straight into the rows of the ``.npy`` cache ``file`` (a worker process's
    task); returns each row with the reason it could not be read, or None."""
    pixels = np.load(file, mmap_mode="r+")
    done: list[tuple[int, str | None]] = []
    for row, path in jobs:
        try:
            pixels[row] = decode_image(Path(path), channels, size, window=window)
            done.append((row, None))
        except DataError as exc:
            done.append((row, str(exc.__cause__ or exc)))
    pixels.flush()
    return done
