"""Attention heatmaps: attention -> percentile ranks -> coloured patches over the slide thumbnail.

Drawn patch by patch at the thumbnail's scale, so memory is bounded by the thumbnail, never the
slide. `gallery` shows the top-k and bottom-k attended patches as two labelled rows of tiles; it
reads only those 2k patches when given a reader (e.g. `SlidePatches.read`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

_LABEL_H = 22  # px of the text band above each gallery row


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
    ranks = percentile_ranks(scores)
    colours = cv2.applyColorMap((ranks * 255).astype(np.uint8).reshape(-1, 1), cv2.COLORMAP_JET)
    colours = colours.reshape(-1, 3)[:, ::-1]  # BGR -> RGB
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
