"""CLAM-equivalent tissue segmentation on a thumbnail (pure numpy / OpenCV).

HSV saturation -> median blur -> threshold (fixed or Otsu) -> morphological close -> contours with
holes (RETR_CCOMP) -> area filters. Unlike CLAM, the area thresholds are in units of the *reference
patch area* (the configured patch at level 0), so small slides, biopsies and TMA cores keep their
tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from efcm.config import TissueParams


@dataclass
class TissueMask:
    """Tissue contours and holes in thumbnail px, and the thumbnail's scale (level-0 px per px)."""

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    scale: tuple[float, float]
    shape: tuple[int, int]  # thumbnail (h, w)
    _raster: np.ndarray | None = field(default=None, repr=False)

    @property
    def raster(self) -> np.ndarray:
        """uint8 (h, w): 1 inside a tissue contour and outside its holes."""
        if self._raster is None:
            m = np.zeros(self.shape, np.uint8)
            if self.contours:
                cv2.drawContours(m, self.contours, -1, 1, -1)
            for hs in self.holes:
                if hs:
                    cv2.drawContours(m, hs, -1, 0, -1)
            self._raster = m
        return self._raster

    @property
    def contour_raster(self) -> np.ndarray:
        m = np.zeros(self.shape, np.uint8)
        if self.contours:
            cv2.drawContours(m, self.contours, -1, 1, -1)
        return m

    @property
    def hole_raster(self) -> np.ndarray:
        m = np.zeros(self.shape, np.uint8)
        for hs in self.holes:
            if hs:
                cv2.drawContours(m, hs, -1, 1, -1)
        return m


def segment_tissue(
    thumbnail: np.ndarray, scale: tuple[float, float], params: TissueParams, ref_patch_px: float
) -> TissueMask:
    """Find tissue on an RGB thumbnail.

    Args:
        thumbnail: (h, w, 3) uint8 RGB.
        scale: level-0 px per thumbnail px (sx, sy).
        params: the tissue section of params.
        ref_patch_px: side of the reference patch at level 0; area filters are multiples of its
        area.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    sat = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), params.mthresh)
    if params.use_otsu:
        _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(sat, params.sthresh, 255, cv2.THRESH_BINARY)
    if params.close > 0:
        binary = cv2.morphologyEx(
            binary, cv2.MORPH_CLOSE, np.ones((params.close, params.close), np.uint8)
        )
    ref_area = ref_patch_px**2 / (scale[0] * scale[1])  # thumbnail px^2
    min_area, min_hole = params.min_area * ref_area, params.min_hole_area * ref_area
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    kept, kept_holes = [], []
    if hierarchy is not None:
        hier = hierarchy[0]
        for i in np.nonzero(hier[:, 3] == -1)[0]:  # foreground (outer) contours
            holes = [contours[j] for j in np.nonzero(hier[:, 3] == i)[0]]
            area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(h) for h in holes)
            if area <= 0 or area < min_area:
                continue
            holes = sorted(holes, key=cv2.contourArea, reverse=True)[: params.max_n_holes]
            kept.append(contours[i])
            kept_holes.append([h for h in holes if cv2.contourArea(h) > min_hole])
    return TissueMask(kept, kept_holes, scale, thumbnail.shape[:2])
