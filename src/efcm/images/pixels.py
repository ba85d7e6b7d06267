"""Checks and conversions of decoded pixel arrays, shared by every format."""

from __future__ import annotations

import numpy as np

from efcm.errors import InvalidImage


def check_size(width: int, height: int, name: str, *, max_pixels: int, min_side: int) -> None:
    """Refuse an image by its header's size, before its pixels are decoded.

    Raises:
        InvalidImage: more than `max_pixels` pixels (`too_large`: a decompression bomb or a
            wrong file), or a side under `min_side` (`too_small`).
    """
    if width * height > max_pixels:
        raise InvalidImage(
            f"{name}: {width} x {height} px is over the limit of {max_pixels} pixels "
            "(image.max_pixels)",
            status="too_large",
        )
    if min(width, height) < min_side:
        raise InvalidImage(
            f"{name}: {width} x {height} px is under the smallest side of {min_side} px "
            "(image.min_side)",
            status="too_small",
        )


def stretch(x: np.ndarray) -> np.ndarray:
    """Any numeric image -> uint8 by a min-max stretch over all its values (a constant image is
    black); uint8 passes unchanged, bool is 0/255."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    x = x.astype(np.float64)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((np.nan_to_num(x, nan=lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
