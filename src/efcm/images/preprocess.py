"""A decoded image -> the uint8 (size, size, 3) RGB array the encoders take (`image` params).

In this order: the fundus crop (`image.crop: fundus`: the square around the circular field of
view, black outside the picture), the channels (`rgb`: colour kept, a grey image replicated;
`grey`: luma replicated to 3 channels), the resize policy (`crop`: shorter side to `size`, then
the centre; `pad`: longer side to `size`, black padding centred; `stretch`: both sides). The
normalisation (mean/std) is the encoder's (`ImageParams.encoder_spec`, applied by
`PatchTransform`), not done here: the output stays uint8, like a slide's patches.

The field of view: the red channel (the brightness of a grey image), median-blurred, above
`image.fov_threshold`; its largest connected region; the points of that region's outline that
are not on the picture's edge (where a clipped circle is cut); a least-squares circle through
them (the Kasa fit), refitted once without the points far from the first circle (a notch, a
lesion on the rim). A black border of any width is outside the region, and a circle clipped at
the top and bottom still gives its true centre and radius.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import cv2
import numpy as np

from efcm.config import ImageParams
from efcm.errors import InvalidImage

FOV_WORK_SIDE = 512  # the field of view is found on a copy at most this large (speed)
MIN_FOV_FRACTION = 0.05  # of the picture: a smaller bright region is no field of view


@dataclass(frozen=True)
class Fov:
    """A circular field of view, in the picture's pixels."""

    cx: float
    cy: float
    r: float

    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the square around the circle (may leave the picture)."""
        left, top = round(self.cx - self.r), round(self.cy - self.r)
        side = max(1, round(2 * self.r))
        return left, top, left + side, top + side


def _fit_circle(pts: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle through (N, 2) points: x^2 + y^2 + D x + E y + F = 0."""
    x, y = pts[:, 0], pts[:, 1]
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x * x + y * y), rcond=None)
    cx, cy = -d / 2, -e / 2
    return cx, cy, float(np.sqrt(max(cx * cx + cy * cy - f, 0.0)))


def _straight_runs(pts: np.ndarray, length: int) -> np.ndarray:
    """Which points of a closed outline lie on a horizontal or vertical run of at least
    `length` points with the same y or x."""
    out = np.zeros(len(pts), bool)
    for axis in (0, 1):
        v = pts[:, axis]
        change = np.flatnonzero(np.diff(v) != 0) + 1
        bounds = np.concatenate([[0], change, [len(v)]])
        for start, end in itertools.pairwise(bounds):
            if end - start >= length:
                out[start:end] = True
    return out


def find_fov(img: np.ndarray, threshold: int, name: str = "image") -> Fov:
    """The circular field of view of a fundus photograph (see the module docstring).

    Raises:
        InvalidImage: no bright region large enough, or no circle fits it (`no_field_of_view`).
    """
    chan = img[..., 0] if img.ndim == 3 else img  # red: the brightest channel of a fundus
    h, w = chan.shape
    scale = min(1.0, FOV_WORK_SIDE / max(h, w))
    if scale < 1.0:
        chan = cv2.resize(chan, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    sh, sw = chan.shape
    mask = (cv2.medianBlur(chan, 5) > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2 or stats[1:, cv2.CC_STAT_AREA].max() < MIN_FOV_FRACTION * sh * sw:
        raise InvalidImage(
            f"{name}: no field of view brighter than {threshold} (image.fov_threshold) covering "
            f"{MIN_FOV_FRACTION:.0%} of the picture",
            status="no_field_of_view",
        )
    region = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(contours, key=len)[:, 0, :].astype(np.float64)
    inner = (pts[:, 0] > 1) & (pts[:, 0] < sw - 2) & (pts[:, 1] > 1) & (pts[:, 1] < sh - 2)
    # where the circle is cut (by the picture's edge, or a black strip inside it) the outline is
    # a straight line, not the rim: longer than the flat top of a digital circle (2 sqrt(r) px)
    straight = _straight_runs(pts, max(12, round(0.1 * min(sh, sw))))
    pts = pts[inner & ~straight]
    if len(pts) < 16:
        raise InvalidImage(
            f"{name}: the field of view has almost no rim inside the picture: no circle to fit",
            status="no_field_of_view",
        )
    cx, cy, r = _fit_circle(pts)
    resid = np.abs(np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r)
    keep = resid <= max(2.0, 3.0 * float(np.median(resid)))
    if keep.sum() >= 16:
        cx, cy, r = _fit_circle(pts[keep])
    if not (np.isfinite(r) and 0.1 * min(sh, sw) <= r <= np.hypot(sh, sw)):
        raise InvalidImage(
            f"{name}: the bright region is not a circular field of view (radius {r:.0f} px of a "
            f"{sw} x {sh} picture)",
            status="no_field_of_view",
        )
    # contour points are pixel centres on the region's edge: the rim is half a pixel further out
    return Fov((cx + 0.5) / scale - 0.5, (cy + 0.5) / scale - 0.5, (r + 0.5) / scale)


def crop_box(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `box` (left, top, right, bottom); black where it leaves the picture."""
    left, top, right, bottom = box
    h, w = img.shape[:2]
    out = np.zeros((bottom - top, right - left, *img.shape[2:]), img.dtype)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
    if x1 > x0 and y1 > y0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = img[y0:y1, x0:x1]
    return out


def to_rgb(img: np.ndarray, channels: str) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W, 3): `grey` makes it luma (ITU-R 601) x 3."""
    if img.ndim == 3 and channels == "grey":
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    shrink = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(
        img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )


def resize_square(img: np.ndarray, size: int, policy: str) -> np.ndarray:
    """(H, W, 3) -> (size, size, 3) by `policy`: `crop`, `pad` or `stretch`."""
    h, w = img.shape[:2]
    if policy == "stretch":
        return _resize(img, size, size)
    scale = size / (min(h, w) if policy == "crop" else max(h, w))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = _resize(img, nw, nh)
    left, top = (nw - size) // 2, (nh - size) // 2  # negative when padding
    return crop_box(img, (left, top, left + size, top + size))


def preprocess(img: np.ndarray, params: ImageParams, name: str = "image") -> np.ndarray:
    """A decoded uint8 image -> uint8 (size, size, 3), by the task's params.

    Raises:
        InvalidImage: the fundus crop finds no field of view.
    """
    if params.crop == "fundus":
        img = crop_box(img, find_fov(img, params.fov_threshold, name).box())
    img = to_rgb(img, params.channels)
    return np.ascontiguousarray(resize_square(img, params.size, params.resize))
