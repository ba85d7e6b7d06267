"""DICOM images with pydicom: the pixels of one frame as uint8, and a small writer.

Grey images (MONOCHROME1, MONOCHROME2) go through the modality LUT (RescaleSlope and
RescaleIntercept, or a Modality LUT Sequence), then the file's first window (WindowCenter and
WindowWidth, with its VOILUTFunction: LINEAR, LINEAR_EXACT or SIGMOID, as DICOM PS3.3 C.11.2.1.2
defines them) to 0-255, or, without a usable window, a min-max stretch; MONOCHROME1 (higher
values darker) is then inverted, so that bone is bright in both. Colour images (RGB, YBR_*: pydicom
converts them to RGB; PALETTE COLOR through its LUT) keep their colour. Multi-frame files give
their first frame. A VOI LUT Sequence is not applied (the window, or min-max, is).

pydicom is imported here only (the `dicom` extra).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from efcm.errors import InvalidImage
from efcm.images.pixels import check_size, stretch

log = logging.getLogger(__name__)

PREAMBLE = 128  # bytes before the "DICM" magic of a DICOM Part 10 file
GREY = ("MONOCHROME1", "MONOCHROME2")


def is_dicom(data: bytes, name: str = "") -> bool:
    """A DICOM Part 10 file (`DICM` after the preamble), or a file named ``*.dcm``."""
    return data[PREAMBLE : PREAMBLE + 4] == b"DICM" or name.lower().endswith(".dcm")


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError:  # a missing dependency is the installation's fault, not the image's
        raise ImportError("reading DICOM images needs pydicom: pip install 'efcm[dicom]'") from None
    return pydicom


def _first(value: Any) -> float:
    """A DICOM number that may be multi-valued (several windows): the first."""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Values -> uint8 0-255 through a DICOM VOI window (PS3.3 C.11.2.1.2).

    Raises:
        ValueError: an unknown function, or a width it does not allow.
    """
    x = np.asarray(x, np.float64)
    fn = (function or "LINEAR").upper()
    if fn == "LINEAR":
        if width < 1:
            raise ValueError(f"a LINEAR window needs width >= 1, got {width}")
        if width == 1:  # the formula's limit: a threshold at center - 0.5
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    elif fn == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"a LINEAR_EXACT window needs width > 0, got {width}")
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    elif fn == "SIGMOID":
        if width <= 0:
            raise ValueError(f"a SIGMOID window needs width > 0, got {width}")
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        raise ValueError(f"unknown VOILUTFunction {function!r}")
    return np.rint(y * 255.0).astype(np.uint8)


def _grey(ds: Any, px: np.ndarray, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    x = apply_modality_lut(px, ds).astype(np.float64)
    out = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        try:
            out = window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), fn)
        except (TypeError, ValueError, IndexError) as err:  # a broken window: say so, stretch
            log.warning("%s: window not used (%s): min-max instead", name, err)
    if out is None:
        out = stretch(x)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: the minimum is white
    return out


def decode_dicom(data: bytes, name: str, *, max_pixels: int, min_side: int) -> np.ndarray:
    """The pixels of a DICOM file (its first frame) as uint8: (H, W) grey or (H, W, 3) RGB.

    Raises:
        InvalidImage: not a readable DICOM (`unreadable`), no pixel data (`no_pixels`), an image
            outside the size limits (`too_large`, `too_small`), or pixel data that cannot be
            decoded (a compressed transfer syntax without its decoder, truncated data).
    """
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as err:  # pydicom raises many types for a broken file: all mean unreadable
        raise InvalidImage(f"{name}: not a readable DICOM file ({type(err).__name__})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if data[PREAMBLE : PREAMBLE + 4] != b"DICM":  # only its name said DICOM
            raise InvalidImage(f"{name}: not a DICOM file (no 'DICM' preamble, no pixel data)")
        raise InvalidImage(f"{name}: a DICOM file without pixel data", status="no_pixels")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.PhotometricInterpretation).strip()
    except (AttributeError, TypeError, ValueError):
        raise InvalidImage(
            f"{name}: DICOM without Rows, Columns or PhotometricInterpretation"
        ) from None
    check_size(cols, rows, name, max_pixels=max_pixels, min_side=min_side)
    try:
        from pydicom.pixels import pixel_array

        px = pixel_array(ds, index=0 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
    except Exception as err:  # a missing decoder or broken data, whichever pydicom met first
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InvalidImage(
            f"{name}: cannot decode the DICOM pixel data (transfer syntax {syntax}: "
            f"{type(err).__name__}: {err})"
        ) from None
    if photometric in GREY:
        return _grey(ds, px, name)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return stretch(apply_color_lut(px, ds))
    if photometric == "RGB" or photometric.startswith("YBR"):  # YBR: pydicom returns RGB
        return stretch(px) if px.ndim == 3 else _grey(ds, px, name)
    raise InvalidImage(f"{name}: unsupported DICOM PhotometricInterpretation {photometric!r}")


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    uid_seed: str = "efcm",
    modality: str = "DX",
) -> Path:
    """Write one frame as an uncompressed DICOM file (explicit VR little endian), deterministic
    for the same arguments (the UIDs derive from `uid_seed`). For the demo and the tests.

    Args:
        pixels: (H, W) uint8 or uint16 (grey; for MONOCHROME1 the stored values as they are),
            or (H, W, 3) uint8 RGB.
        window: (center, width) written as WindowCenter, WindowWidth (in rescaled units).
        rescale: (slope, intercept) written as RescaleSlope, RescaleIntercept.
    """
    pydicom = _pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    uid = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = modality
    ds.PatientID = uid_seed[:64]
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    if rescale != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
