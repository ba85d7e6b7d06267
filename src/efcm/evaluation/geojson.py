"""Attention as GeoJSON that QuPath opens: one tile polygon per patch, the scores as measurements.

QuPath's GeoJSON (File > Import objects, or drag and drop): a FeatureCollection whose features
each have a Polygon geometry in level-0 pixels (origin top left, x right, y down) and
`properties.objectType` ("annotation", "detection", "tile", ...), with `properties.measurements`
a name -> number mapping shown in its measurement tables and usable for colouring by measurement
(Measure > Show measurement maps). No classification is set: the attention is a score, not a
class.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from efcm.evaluation.heatmap import percentile_ranks

ATTENTION = "attention"
PERCENTILE = "attention percentile"


def tiles(
    coords: np.ndarray, size0: int, scores: np.ndarray, dimensions: tuple[int, int]
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection: patch i is a closed 5-point Polygon (its level-0 square,
    clipped to the slide's `dimensions` (w, h)), an object of type "tile" with the measurements
    `attention` (scores[i], as given) and `attention percentile` (0 .. 100, as in the heatmap).

    Raises:
        ValueError: coords and scores differ in length, or a patch lies outside the slide.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} attention scores")
    w0, h0 = (int(v) for v in dimensions)
    pct = percentile_ranks(scores) * 100
    features = []
    for i, ((x, y), score, p) in enumerate(zip(coords.tolist(), scores, pct, strict=True)):
        x1, y1 = min(x + size0, w0), min(y + size0, h0)
        if not (0 <= x < x1 and 0 <= y < y1):
            raise ValueError(f"patch {i} at ({x}, {y}) lies outside the {w0} x {h0} slide")
        ring = [[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]  # closed: QuPath, like GeoJSON
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"patch {i}",
                    "measurements": {ATTENTION: float(score), PERCENTILE: round(float(p), 4)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def encode(collection: dict[str, Any]) -> bytes:
    """The GeoJSON as compact UTF-8 JSON text."""
    return json.dumps(collection, separators=(",", ":")).encode("utf-8")
