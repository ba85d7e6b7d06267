"""A structural check of the attention GeoJSON (`efcm.evaluation.geojson`), shared by the unit and
serving tests: what QuPath needs to open it as one tile per patch with the scores."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from efcm.evaluation.heatmap import percentile_ranks


def check_attention_geojson(
    doc: dict[str, Any] | bytes | str,
    coords: np.ndarray,
    size0: int | None,
    attention: np.ndarray,
    dimensions: tuple[int, int],
) -> None:
    """Asserts: a FeatureCollection of one closed 5-point Polygon per patch, in patch order, with
    integer level-0 coordinates inside the slide (a square of side `size0` unless clipped at the
    slide's edge), objectType "tile", no classification, measurements `attention` equal to the
    attention and `attention percentile` its rank in 0..100. `size0` None: the side is not known
    to the caller (only that each tile is a square or edge-clipped rectangle at its coords)."""
    if not isinstance(doc, dict):
        doc = json.loads(doc)
    w0, h0 = dimensions
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert len(feats) == len(coords) == len(attention) > 0
    pct = percentile_ranks(np.asarray(attention, np.float64)) * 100
    for f, (x, y), a, p in zip(feats, np.asarray(coords).tolist(), attention, pct, strict=True):
        assert f["type"] == "Feature"
        geom = f["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1  # no holes
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed
        assert all(isinstance(v, int) for pt in ring for v in pt)
        xs, ys = [pt[0] for pt in ring], [pt[1] for pt in ring]
        assert min(xs) >= 0 and max(xs) <= w0 and min(ys) >= 0 and max(ys) <= h0
        assert (min(xs), min(ys)) == (x, y)
        # an axis-aligned rectangle: every edge horizontal or vertical, four distinct corners
        for (ax, ay), (bx, by) in itertools.pairwise(ring):
            assert (ax == bx) != (ay == by)
        if size0 is not None:
            assert max(xs) == min(x + size0, w0) and max(ys) == min(y + size0, h0)
        props = f["properties"]
        assert props["objectType"] == "tile" and "classification" not in props
        m = props["measurements"]
        assert m["attention"] == float(a)
        assert abs(m["attention percentile"] - p) < 1e-3
