"""The bytes of an image file -> a uint8 array: (H, W) grey or (H, W, 3) RGB.

PNG, JPEG and TIFF are decoded by OpenCV at their own depth (a TIFF OpenCV cannot read by
tifffile), DICOM by `efcm.images.dicom`. An image deeper than 8 bits (16-bit PNG or TIFF, float
TIFF) without a DICOM window is stretched min to max over all its channels (colour balance kept),
so a 12-bit X-ray stored in 16 bits uses the whole 0-255 range. Alpha is dropped. The size is
checked from the header before any pixel is decoded (`image.max_pixels`, `image.min_side`).
JPEG EXIF orientation is not applied (fundus and X-ray devices write pixels upright).

Every bad file raises `efcm.errors.InvalidImage` naming it and the problem; its `status` is the
status-CSV code (`unreadable`, `no_pixels`, `too_large`, `too_small`).
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np

from efcm.errors import InvalidImage
from efcm.images.dicom import decode_dicom, is_dicom
from efcm.images.pixels import check_size, stretch

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
FORMATS = "PNG, JPEG, TIFF or DICOM"


def _header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit decides
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except Image.DecompressionBombError:
        raise InvalidImage(
            f"{name}: the header announces an image of absurd size", status="too_large"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        if data[:4] in TIFF_MAGIC:
            return _tiff_size(data, name)
        raise InvalidImage(f"{name}: not an image ({FORMATS}), or a corrupt one") from None


def _tiff_size(data: bytes, name: str) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            page = tf.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except Exception as err:  # tifffile raises several types for a broken file
        raise InvalidImage(f"{name}: corrupt TIFF ({type(err).__name__})") from None


def _tiff_pixels(data: bytes, name: str) -> np.ndarray:
    import tifffile

    try:
        return tifffile.imread(io.BytesIO(data), key=0)
    except Exception as err:  # a compression tifffile cannot decode, truncated data
        raise InvalidImage(
            f"{name}: TIFF pixels cannot be decoded ({type(err).__name__})"
        ) from None


def _to_rgb_order(arr: np.ndarray, from_opencv: bool) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W) or (H, W, 3) RGB."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 3 and from_opencv:
        arr = arr[..., ::-1]  # OpenCV's BGR
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"unsupported pixel layout {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(data: bytes, name: str, *, max_pixels: int, min_side: int) -> np.ndarray:
    """Decode an image file's bytes to uint8 (H, W) grey or (H, W, 3) RGB.

    Args:
        data: the whole file.
        name: the file or URI, for messages.

    Raises:
        InvalidImage: empty, not an image, corrupt, outside the size limits, a DICOM without
            pixel data; the message names `name`.
    """
    if not data:
        raise InvalidImage(f"{name}: empty file (0 bytes)")
    if is_dicom(data, name):
        return decode_dicom(data, name, max_pixels=max_pixels, min_side=min_side)
    width, height = _header_size(data, name)
    check_size(width, height, name, max_pixels=max_pixels, min_side=min_side)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    from_opencv = arr is not None
    if arr is None:
        if data[:4] not in TIFF_MAGIC:
            raise InvalidImage(f"{name}: truncated or corrupt image ({FORMATS})")
        arr = _tiff_pixels(data, name)
    try:
        arr = _to_rgb_order(arr, from_opencv)
    except ValueError as err:
        raise InvalidImage(f"{name}: {err}") from None
    if arr.shape[:2] != (height, width):  # a header that lies about the pixels
        raise InvalidImage(
            f"{name}: decoded {arr.shape[1]} x {arr.shape[0]} px, its header says "
            f"{width} x {height}"
        )
    return stretch(arr)
