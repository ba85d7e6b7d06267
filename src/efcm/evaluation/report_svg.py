"""ROC curves drawn as inline SVG for the HTML report (`efcm.evaluation.report`).

Plain SVG markup written in Python: no JavaScript, no plotting library, nothing fetched, so the page
stays one self-contained file that the Kubeflow UI (which sandboxes HTML outputs) shows as it is.
Every string that goes into the markup is escaped.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# room for the tick labels (left, bottom) and the axis titles
_LEFT, _BOTTOM, _TOP, _RIGHT = 46, 40, 10, 12


@dataclass(frozen=True)
class Curve:
    """One ROC curve: points in the order of decreasing threshold (as `roc/<row>.csv` has them)."""

    label: str
    fpr: Sequence[float]
    tpr: Sequence[float]
    colour: str
    dashed: bool = False


def read_roc(path: str | Path) -> tuple[list[float], list[float]]:
    """(fpr, tpr) of a `roc/<row>.csv` (columns fpr, tpr, threshold), file order kept.

    Raises:
        FileNotFoundError: the file is absent.
        ValueError: a column is missing, a value is not a number in [0, 1], or there are no rows.
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("fpr", "tpr") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} (has {reader.fieldnames})")
        fpr, tpr = [], []
        for i, r in enumerate(reader, start=2):
            try:
                x, y = float(r["fpr"]), float(r["tpr"])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {i}: fpr/tpr {r['fpr']!r}, {r['tpr']!r}") from None
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):  # also rejects NaN
                raise ValueError(f"{path} line {i}: fpr {x}, tpr {y} outside [0, 1]")
            fpr.append(x)
            tpr.append(y)
    if not fpr:
        raise ValueError(f"{path}: no points")
    return fpr, tpr


def roc_svg(curves: Sequence[Curve], title: str, *, size: int = 280) -> str:
    """An `<svg>` of ROC curves on the unit square with the chance diagonal, ticks at 0, 0.5 and 1,
    and a legend in the lower right (where ROC curves rarely run)."""
    side = size - _LEFT - _RIGHT  # the plot is square
    height = _TOP + side + _BOTTOM

    def px(v: float) -> float:
        return round(_LEFT + v * side, 1)

    def py(v: float) -> float:
        return round(_TOP + (1.0 - v) * side, 1)

    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="roc-plot" width="{size}" '
        f'height="{height}" viewBox="0 0 {size} {height}" role="img" aria-label="{e(title)}" '
        'font-family="sans-serif" font-size="11">',
        f"<title>{e(title)}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{side}" height="{side}" fill="#fff" stroke="#999"/>',
    ]
    for v in (0.25, 0.5, 0.75):  # light grid
        out.append(
            f'<line x1="{px(v)}" y1="{py(0)}" x2="{px(v)}" y2="{py(1)}" stroke="#eee"/>'
            f'<line x1="{px(0)}" y1="{py(v)}" x2="{px(1)}" y2="{py(v)}" stroke="#eee"/>'
        )
    for v, text in ((0.0, "0"), (0.5, "0.5"), (1.0, "1")):
        out.append(
            f'<text x="{px(v)}" y="{py(0) + 14}" text-anchor="middle">{text}</text>'
            f'<text x="{px(0) - 5}" y="{py(v) + 4}" text-anchor="end">{text}</text>'
        )
    out.append(
        f'<text x="{px(0.5)}" y="{height - 6}" text-anchor="middle">false positive rate</text>'
        f'<text transform="translate(13 {py(0.5)}) rotate(-90)" text-anchor="middle">'
        "true positive rate</text>"
        f'<line class="chance" x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" '
        'stroke="#bbb" stroke-dasharray="3 3"/>'
    )
    for c in curves:
        points = " ".join(
            f"{px(x)},{py(y)}"
            for x, y in zip(c.fpr, c.tpr, strict=True)
            if math.isfinite(x) and math.isfinite(y)
        )
        dash = ' stroke-dasharray="6 4"' if c.dashed else ""
        out.append(
            f'<polyline class="roc" data-label="{e(c.label)}" points="{points}" fill="none" '
            f'stroke="{e(c.colour)}" stroke-width="2"{dash}><title>{e(c.label)}</title></polyline>'
        )
    # legend: one line per curve, stacked upwards from the lower right corner
    for i, c in enumerate(reversed(curves)):
        y = py(0) - 8 - 15 * i
        dash = ' stroke-dasharray="6 4"' if c.dashed else ""
        out.append(
            f'<line x1="{px(1) - 150}" y1="{y - 4}" x2="{px(1) - 128}" y2="{y - 4}" '
            f'stroke="{e(c.colour)}" stroke-width="2"{dash}/>'
            f'<text x="{px(1) - 124}" y="{y}">{e(c.label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
