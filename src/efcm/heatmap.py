"""Attention heatmaps: attention -> percentile ranks -> coloured patches over the slide thumbnail.

Drawn patch by patch at the thumbnail's scale, so memory is bounded by the thumbnail, never the
slide.
"""

from __future__ import annotations

import cv2
import numpy as np


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
    heat = np.zeros_like(thumbnail)
    covered = np.zeros(thumbnail.shape[:2], bool)
    sx, sy = scale
    for (x, y), c in zip(coords, colours, strict=True):
        x0, y0 = int(x / sx), int(y / sy)
        x1, y1 = max(x0 + 1, int((x + size0) / sx)), max(y0 + 1, int((y + size0) / sy))
        heat[y0:y1, x0:x1] = c
        covered[y0:y1, x0:x1] = True
    out = thumbnail.copy()
    out[covered] = ((1 - alpha) * thumbnail[covered] + alpha * heat[covered]).astype(np.uint8)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
