"""DICOM files as images: pydicom decodes the pixel data, then the display pipeline a radiologist's viewer applies.

Modality LUT (rescale slope/intercept), then the file's VOI LUT or window (centre/width), then MONOCHROME1 inverted
so that bright is dense everywhere, then the values mapped to 8 bits over the range that pipeline produces (the
window's output range, or the image's own range when the file has no window). Multi-frame files and transfer
syntaxes no installed handler decodes are refused with the reason. Nothing of the header but what decoding needs is
read: patient data is never logged or returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from cellcls.errors import ConfigError, DataError

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
MAGIC_OFFSET = 128  # the Part 10 preamble, then b"DICM"


def is_dicom(source: Path | BinaryIO) -> bool:
    """Whether ``source`` is a DICOM Part 10 file: its extension, or the ``DICM`` marker after the preamble."""
    if isinstance(source, (str, os.PathLike)):  # a path given as text is a path too
        source = Path(source)
    if isinstance(source, Path) and source.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        if isinstance(source, Path):
            with source.open("rb") as fh:
                head = fh.read(MAGIC_OFFSET + 4)
        else:
            start = source.tell()
            head = source.read(MAGIC_OFFSET + 4)
            source.seek(start)
    except OSError:
        return False
    return head[MAGIC_OFFSET:MAGIC_OFFSET + 4] == b"DICM"


def _dataset(source: Path | BinaryIO, label: str, pixels: bool):
    """The parsed file (without its pixel data unless ``pixels``), or a DataError naming ``label``."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise DataError(f"{label}: reading DICOM files needs pydicom (pip install 'cellcls[dicom]')") from exc
    try:
        return pydicom.dcmread(source, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot decode image {label}: not a readable DICOM file ({exc})") from exc


def dicom_header(source: Path | BinaryIO, label: str) -> tuple[int, int, str]:
    """Width, height and a mode name (``DICOM MONOCHROME2``, ...) from the header alone."""
    ds = _dataset(source, label, pixels=False)
    return int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), f"DICOM {ds.get('PhotometricInterpretation', '')}".strip()


def header_values(paths: Sequence[Path], keyword: str, setting: str = "dataset.group_tag") -> list[str | None]:
    """The value of the header element ``keyword`` (e.g. ``PatientID``) of each file; None where a file is not a
    readable DICOM file or lacks it. Only that element is parsed; ``setting`` is what errors name."""
    try:
        import pydicom
        from pydicom.datadict import tag_for_keyword
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise ConfigError(f"{setting} reads DICOM headers: it needs pydicom (pip install 'cellcls[dicom]')") from exc
    if tag_for_keyword(keyword) is None:
        raise ConfigError(f"{setting}={keyword!r} is not a DICOM keyword (e.g. PatientID, StudyInstanceUID)")
    values: list[str | None] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
            value = str(ds.get(keyword, "") or "").strip()
        except (InvalidDicomError, OSError, ValueError, EOFError):  # no group; counted by the caller
            value = ""
        values.append(value or None)
    return values


def read_dicom(source: Path | BinaryIO, label: str, limit: int, window: Sequence[float] | None = None) -> Image.Image:
    """The image of a DICOM file as an 8-bit Pillow image (L, or RGB for colour files); ``window`` (centre, width,
    in modality units such as Hounsfield) replaces the file's own VOI LUT or window (``dataset.dicom_window``)."""
    ds = _dataset(source, label, pixels=True)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise DataError(f"cannot decode image {label}: the DICOM file holds no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > limit:
        raise DataError(f"{label}: {cols}x{rows} pixels is over the limit of {limit:,} pixels (CELLCLS_MAX_PIXELS)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{label}: a multi-frame DICOM file ({frames} frames); cellcls classifies single images")
    try:
        with _quiet("pydicom"):  # pydicom logs each failing decoder's traceback; the DataError below says it once
            pixels = ds.pixel_array
    # pydicom signals a transfer syntax with no installed decoder as NotImplementedError (or RuntimeError,
    # by handler); ValueError/AttributeError: pixel data that does not match its header
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        lines = [ln.strip(" :") for ln in str(exc).splitlines() if ln.strip(" :")]
        if "raised by all available plugins" in str(exc):  # a decoder exists and found the data broken
            raise DataError(f"cannot decode image {label}: its pixel data (transfer syntax {name}) is corrupt "
                            f"({lines[-1]})") from exc
        raise DataError(f"cannot decode image {label}: its pixel data (transfer syntax {name}) cannot be decoded by "
                        f"the installed handlers ({lines[0] if lines else type(exc).__name__}); pydicom's "
                        "documentation lists the packages that add them (e.g. pylibjpeg)") from exc
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        return Image.fromarray(_to_uint8(pixels, *_stored_range(ds)), mode="RGB")
    values = apply_modality_lut(pixels, ds)
    low, high = float(values.min()), float(values.max())
    if window is not None:  # linear, as DICOM's window: centre +- width / 2 spans the output range
        centre, width = (float(v) for v in window)
        low, high = centre - width / 2, centre + width / 2
        values = np.clip(np.asarray(values, dtype=np.float64), low, high)
    elif "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        values = apply_voi_lut(values, ds)
        low, high = _voi_range(ds, values)
    values = np.asarray(values, dtype=np.float64)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":  # low values are bright: invert
        values = low + high - values
    return Image.fromarray(_to_uint8(values, low, high), mode="L")


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", 8))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _voi_range(ds, values: np.ndarray) -> tuple[float, float]:
    """The output range of the VOI step: the LUT entries' bit depth, or for a window the range pydicom's
    ``apply_windowing`` maps it onto (the stored range, through the modality LUT or rescale when there is one)."""
    if "VOILUTSequence" in ds:
        return 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    else:
        low, high = _stored_range(ds)
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
