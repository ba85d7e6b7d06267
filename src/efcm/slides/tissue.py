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


def ink_mask(thumbnail: np.ndarray, params: TissueParams) -> np.ndarray:
    """uint8 (h, w): 1 where the thumbnail is not tissue though it is saturated or dark: pen marks
    (green, blue, red ink), black marker, and near-white grey background.

    Hue windows (OpenCV hue, 0-180) keep clear of H&E: eosin is pink-magenta (hue ~150-175,
    moderate saturation), haematoxylin purple (~125-160); green ink is ~35-90, blue ink ~95-124,
    red ink is red (<= 8 or >= 176) and far more saturated than eosin.
    """
    hsv = cv2.cvtColor(thumbnail, cv2.COLOR_RGB2HSV)
    return _not_tissue(hsv, _blurred_saturation(hsv, params), params)


def _blurred_saturation(hsv: np.ndarray, params: TissueParams) -> np.ndarray:
    return cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), params.mthresh)


def _not_tissue(hsv: np.ndarray, sat_blurred: np.ndarray, params: TissueParams) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = np.zeros(h.shape, np.uint8)
    if params.filter_ink:
        green = (h >= 35) & (h <= 90) & (s > 60) & (v > 40)
        blue = (h >= 95) & (h <= 124) & (s > 90) & (v > 40)
        red = ((h <= 8) | (h >= 176)) & (s > 150) & (v > 60)
        ink = (green | blue | red).astype(np.uint8)
    if ink.any():
        # the JPEG-blurred rim of a stroke is less saturated than its core: widen the mask a little
        ink = cv2.dilate(ink, np.ones((3, 3), np.uint8))
    # dark and grey-white on smoothed channels, as the saturation test: pale tissue has scattered
    # near-grey pixels that must not punch holes into it (a box mean of the value is enough here)
    vb = cv2.blur(np.ascontiguousarray(v), (params.mthresh, params.mthresh))
    dark = vb < params.black_value
    grey_white = (vb > params.white_value) & (sat_blurred < 12)
    return (ink.astype(bool) | dark | grey_white).astype(np.uint8)


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
    sat = _blurred_saturation(hsv, params)
    if params.use_otsu:
        _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    else:
        _, binary = cv2.threshold(sat, params.sthresh, 255, cv2.THRESH_BINARY)
    binary[_not_tissue(hsv, sat, params) > 0] = 0
    if params.close > 0:
        kernel = np.ones((params.close, params.close), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
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


def to_geojson(mask: TissueMask, properties: dict | None = None) -> dict:
    """The tissue contours as a GeoJSON FeatureCollection in level-0 px (QuPath opens it): one
    Polygon per tissue region, its holes as interior rings."""
    sx, sy = mask.scale

    def ring(c: np.ndarray) -> list[list[float]]:
        pts = [[round(float(x) * sx, 1), round(float(y) * sy, 1)] for x, y in c.reshape(-1, 2)]
        return [*pts, pts[0]] if pts and pts[0] != pts[-1] else pts

    features = []
    for contour, holes in zip(mask.contours, mask.holes, strict=True):
        if len(contour) < 3:
            continue
        rings = [ring(contour)] + [ring(h) for h in holes if len(h) >= 3]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue"},
                    **(properties or {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
