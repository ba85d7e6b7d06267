"""Attention heatmaps: attention -> percentile ranks -> coloured patches over the slide thumbnail.

`render` draws the heatmap people read: the slide read from its pyramid at the level closest to
(not smaller than) the requested size, the patches drawn over it as filled rectangles, and a colour
legend in a band below, the whole image `size` px on its longest side. Drawn patch by patch at
the output's scale, so memory is bounded by the output size, never the slide. `gallery` shows the
top-k and bottom-k attended patches as two labelled rows of tiles; it reads only those 2k patches
when given a reader (e.g. `SlidePatches.read`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import openslide

from efcm.slides.reader import read_thumbnail

_LABEL_H = 22  # px of the text band above each gallery row
DEFAULT_SIZE = 1024  # px, the longest side of a rendered heatmap
MIN_SIZE, MAX_SIZE = 64, 8192  # the sizes a heatmap may be asked for
LEGEND_TITLE = "attention percentile among this slide's patches"
_LEGEND_MIN_W = 360  # px: a narrow (tall) slide's image is widened so the legend stays legible
_WHITE = (255, 255, 255)
_INK = (0, 0, 0)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share the mean rank): robust to the softmax's tiny values."""
    scores = np.asarray(scores, np.float64)
    if len(scores) <= 1:
        return np.ones_like(scores)
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    _, inv = np.unique(scores, return_inverse=True)
    sums = np.bincount(inv, ranks)
    counts = np.bincount(inv)
    return (sums / counts)[inv] / (len(scores) - 1)


def colour_map(ranks: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB: the jet colour of each rank in [0, 1] (0 dark blue .. 1 dark red)."""
    levels = (np.clip(np.asarray(ranks, np.float64), 0, 1) * 255).astype(np.uint8)
    if levels.size == 0:  # OpenCV returns None for an empty image
        return np.zeros((0, 3), np.uint8)
    return cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_JET).reshape(-1, 3)[:, ::-1]


def overlay(
    thumbnail: np.ndarray,
    scale: tuple[float, float],
    coords: np.ndarray,
    size0: int,
    scores: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
    """RGB (h, w, 3) uint8: the thumbnail with each patch tinted by its attention rank (jet
    colormap).

    Args:
        thumbnail: RGB (h, w, 3) uint8.
        scale: level-0 px per thumbnail px (sx, sy).
        coords: (N, 2) level-0 top-left of each patch.
        size0: patch side in level-0 px.
        scores: (N,) attention (any monotone score).
    """
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} attention scores")
    colours = colour_map(percentile_ranks(scores))
    # blended patch by patch into one copy of the thumbnail: no thumbnail-sized temporaries; where
    # patches overlap, the later one wins
    out = thumbnail.copy()
    sx, sy = scale
    for (x, y), c in zip(coords, colours, strict=True):
        x0, y0 = int(x / sx), int(y / sy)
        x1, y1 = max(x0 + 1, int((x + size0) / sx)), max(y0 + 1, int((y + size0) / sy))
        region = thumbnail[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = ((1 - alpha) * region + alpha * c).astype(np.uint8)
    return out


def check_size(size: int, name: str = "heatmap size") -> int:
    """`size` as an int if it is a whole number of px in [MIN_SIZE, MAX_SIZE]; else ValueError
    naming `name` and the range."""
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(
            f"{name} must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {size!r}"
        )
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"{name} must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    return int(size)


def legend_height(size: int) -> int:
    """px of the legend band under a heatmap whose longest side is `size`."""
    return int(np.clip(round(size * 0.06), 32, 120))


def _fit_text(text: str, width: int, height: int) -> tuple[float, int]:
    # the largest font scale (and its stroke) whose text fits in width x height
    (tw, th), base = cv2.getTextSize(text, _FONT, 1.0, 1)
    scale = max(0.25, min(width / max(tw, 1), height / max(th + base, 1)))
    return scale, max(1, round(scale * 1.5))


def draw_legend(band: np.ndarray, title: str = LEGEND_TITLE) -> None:
    """Draws, in place on the RGB `band`, the colour bar of `overlay`'s colours with its scale
    ("0", "50", "100" percentile) on the upper half and `title` on the lower half."""
    h, w = band.shape[:2]
    band[:] = _WHITE
    pad = max(2, h // 10)
    row = (h - 3 * pad) // 2  # the bar's row and the title's row
    scale, thick = _fit_text("100", w // 8, row)
    (w100, _), _ = cv2.getTextSize("100", _FONT, scale, thick)
    (w0, th), _ = cv2.getTextSize("0", _FONT, scale, thick)
    x0, x1 = pad + w0 + pad, w - pad - w100 - pad
    y0, y1 = pad, pad + row
    if x1 > x0:
        bar = colour_map(np.linspace(0, 1, x1 - x0))
        band[y0:y1, x0:x1] = bar[None, :, :]
        cv2.rectangle(band, (x0 - 1, y0 - 1), (x1, y1), _INK, 1)
        for q in (0.25, 0.5, 0.75):  # ticks at the quartiles
            xq = x0 + round(q * (x1 - x0 - 1))
            cv2.line(band, (xq, y1 - max(2, row // 3)), (xq, y1 - 1), _INK, 1)
    ty = y0 + (row + th) // 2
    cv2.putText(band, "0", (pad, ty), _FONT, scale, _INK, thick, cv2.LINE_AA)
    cv2.putText(band, "100", (w - pad - w100, ty), _FONT, scale, _INK, thick, cv2.LINE_AA)
    tscale, tthick = _fit_text(title, w - 2 * pad, row)
    (tw, tth), _ = cv2.getTextSize(title, _FONT, tscale, tthick)
    cv2.putText(
        band,
        title,
        ((w - tw) // 2, y1 + pad + (row + tth) // 2),
        _FONT,
        tscale,
        _INK,
        tthick,
        cv2.LINE_AA,
    )


def render(
    slide: openslide.OpenSlide,
    coords: np.ndarray,
    size0: int,
    scores: np.ndarray,
    size: int = DEFAULT_SIZE,
    alpha: float = 0.5,
) -> np.ndarray:
    """RGB uint8 image, `size` px on its longest side: the slide with each patch tinted by its
    attention percentile (`overlay`), and under it a band with the colour legend (`draw_legend`).

    The slide is read by `read_thumbnail` from the pyramid level closest to (not smaller than)
    the drawn size, in chunks, then resized: memory is bounded by the output size whatever the
    slide's. A slide smaller than the drawn size is scaled up.

    Args:
        slide: an open slide.
        coords: (N, 2) level-0 top-left of each patch.
        size0: patch side in level-0 px.
        scores: (N,) attention (any monotone score).
        size: the image's longest side in px (MIN_SIZE .. MAX_SIZE).
    """
    size = check_size(size)
    w0, h0 = slide.dimensions
    band = legend_height(size)
    s = min(size / w0, (size - band) / h0)  # output px per level-0 px
    mw, mh = max(1, round(w0 * s)), max(1, round(h0 * s))
    thumb, _ = read_thumbnail(slide, 1 / s, max(mw, mh))
    shrink = thumb.shape[1] > mw
    thumb = cv2.resize(
        thumb, (mw, mh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    drawn = overlay(thumb, (w0 / mw, h0 / mh), coords, size0, scores, alpha)
    width = max(mw, min(size, _LEGEND_MIN_W))
    out = np.full((mh + band, width, 3), 255, np.uint8)
    left = (width - mw) // 2
    out[:mh, left : left + mw] = drawn
    draw_legend(out[mh:])
    return out


def _as_rgb_tile(patch: np.ndarray, tile: int) -> np.ndarray:
    img = np.asarray(patch)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"a patch must be (h, w, 3) RGB, got shape {list(img.shape)}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    interp = cv2.INTER_AREA if max(img.shape[:2]) > tile else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (tile, tile), interpolation=interp)


def gallery(
    patches: Sequence[np.ndarray] | np.ndarray | Callable[[int], np.ndarray],
    scores: np.ndarray,
    k: int = 8,
    *,
    tile: int = 96,
    pad: int = 4,
    labels: tuple[str, str] = ("top {k} attention", "bottom {k} attention"),
) -> np.ndarray:
    """RGB (h, w, 3) uint8: the k highest-scored patches (top row, highest first) and the k
    lowest-scored (bottom row, lowest first), each tile resized to `tile` px, each row under a
    text label. A slide with fewer than 2k patches shows some patches in both rows.

    Args:
        patches: N RGB patches (a sequence, an (N, h, w, 3) array) or a reader ``i -> patch``
            (only the 2k shown are read).
        scores: (N,) attention (any monotone score; ties keep the patch order).
        k: tiles per row (min(k, N) when the slide has fewer patches).
        labels: the rows' labels; ``{k}`` is replaced by the tiles per row.
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    n = len(scores)
    if n == 0:
        raise ValueError("gallery needs at least one patch (got 0 scores)")
    if k < 1 or tile < 1 or pad < 0:
        raise ValueError(f"gallery needs k >= 1, tile >= 1, pad >= 0 (got {k}, {tile}, {pad})")
    read = patches if callable(patches) else patches.__getitem__
    if not callable(patches) and len(patches) != n:
        raise ValueError(f"{len(patches)} patches but {n} scores")
    kk = min(k, n)
    order = np.argsort(-scores, kind="stable")
    rows = [order[:kk], np.argsort(scores, kind="stable")[:kk]]
    width = kk * (tile + pad) + pad
    row_h = _LABEL_H + tile + pad
    out = np.full((2 * row_h + pad, width, 3), 255, np.uint8)
    for r, (idx, label) in enumerate(zip(rows, labels, strict=True)):
        y0 = pad + r * row_h
        cv2.putText(
            out,
            label.format(k=kk),
            (pad, y0 + _LABEL_H - 7),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        for c, i in enumerate(idx):
            x0, ty = pad + c * (tile + pad), y0 + _LABEL_H
            out[ty : ty + tile, x0 : x0 + tile] = _as_rgb_tile(read(int(i)), tile)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
