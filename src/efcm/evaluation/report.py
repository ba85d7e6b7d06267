"""A self-contained HTML page for the Kubeflow UI (and `dvc repro`): the audit of a run.

- Evaluation (`efcm.evaluation.report_eval`, from the evaluation and gate directories if given): the
  promotion gate's verdict and rule, the teacher vs student table with the paired deltas and their
  intervals, the ROC curves (inline SVG, `efcm.evaluation.report_svg`), the efficiency figures, and
  what the distillation saw. A missing part shows as "not available".
- Patching: every slide's status (ok, no_tissue, no_mpp, ...) and patch count, and the QC
  thumbnails (tissue contours, holes, patch grid), the slides that did not patch first.
- Heatmaps: for the `n_heatmaps` slides the model (a train-mil or strategy output with
  `predictions.csv` and `attention.h5`) is most sure are of the last class, the out-of-fold
  attention over the QC thumbnail (`efcm.evaluation.heatmap.overlay`, percentile ranks, jet),
  with the label and the predicted probabilities.

Images are PNG data URIs, downscaled to `max_px`, so the page is one file the UI can show.
"""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

import cv2
import h5py
import numpy as np

from efcm.evaluation.heatmap import encode_png, overlay
from efcm.evaluation.report_eval import STYLE as EVAL_STYLE
from efcm.evaluation.report_eval import evaluation_sections
from efcm.io.results import read_attention
from efcm.io.status import read_status
from efcm.slides.patching import read_coords

_STYLE = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
    ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0}"
    "figcaption{font-size:12px;max-width:320px}nav a{margin-right:1em}"
    "h2{margin-top:1.4em;border-bottom:1px solid #ddd}"
)
_NAV = (
    "<nav><a href='#gate'>gate</a><a href='#comparison'>teacher vs students</a>"
    "<a href='#roc'>ROC</a><a href='#efficiency'>efficiency</a>"
    "<a href='#distillation-data'>distillation data</a><a href='#heatmaps'>heatmaps</a>"
    "<a href='#qc'>patching QC</a></nav>"
)


def _img(rgb: np.ndarray, max_px: int) -> str:
    h, w = rgb.shape[:2]
    f = min(1.0, max_px / max(h, w))
    if f < 1:
        size = (max(1, int(w * f)), max(1, int(h * f)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    data = base64.b64encode(encode_png(rgb)).decode()
    return f'<img src="data:image/png;base64,{data}" alt="">'


def _read_rgb(path: Path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _heatmap(patches_dir: Path, sid: str, attention: np.ndarray) -> np.ndarray | None:
    """The attention overlay on the slide's QC thumbnail, or None when either is missing or the
    attention does not match the slide's patches."""
    thumb = _read_rgb(patches_dir / "qc" / f"{sid}.png")
    coords_path = patches_dir / "patches" / f"{sid}.h5"
    if thumb is None or not coords_path.is_file():
        return None
    cf = read_coords(coords_path)
    with h5py.File(coords_path, "r") as f:  # the slide's size: our coords files record it
        attrs = f["coords"].attrs
        if "level_dim" not in attrs or "downsample" not in attrs or cf.size0 is None:
            return None  # a CLAM / TRIDENT coords file: no heatmap, the QC part still shows
        width0, height0 = np.asarray(attrs["level_dim"]) * np.asarray(attrs["downsample"])
    coords, size0 = cf.coords, int(cf.size0)
    if len(coords) != len(attention) or len(coords) == 0:
        return None
    scale = (width0 / thumb.shape[1], height0 / thumb.shape[0])
    return overlay(thumb, scale, coords, size0, attention)


def html_report(
    patches_dir: str | Path,
    mil_dir: str | Path,
    out: str | Path,
    classes: tuple[str, ...],
    *,
    evaluation_dir: str | Path | None = None,
    gate_dir: str | Path | None = None,
    title: str = "EFCM run",
    n_qc: int = 24,
    n_heatmaps: int = 8,
    max_px: int = 384,
) -> Path:
    """Write the page to `out`; returns its path.

    Args:
        patches_dir: output of `efcm patch` (status.csv, qc/, patches/).
        mil_dir: the exported model's train-mil or strategy output (predictions.csv, attention.h5).
        out: the HTML file to write.
        classes: the class names, in params order (the last is the ROC's positive class).
        evaluation_dir: output of `efcm evaluate`; None: its sections say "not available".
        gate_dir: output of `efcm gate`; None: its section says "not available".
        title: the page title.
        n_qc: QC thumbnails shown at most.
        n_heatmaps: heatmaps shown at most.
        max_px: the longest side of every image.
    """
    patches_dir, mil_dir, out = Path(patches_dir), Path(mil_dir), Path(out)
    status = read_status(patches_dir / "status.csv")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}{EVAL_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        _NAV,
        evaluation_sections(evaluation_dir, gate_dir, classes[-1]),
    ]

    # heatmaps of the exported model
    preds_path = mil_dir / "predictions.csv"
    att_path = mil_dir / "attention.h5"
    parts.append(f"<h2 id='heatmaps'>Attention heatmaps ({html.escape(mil_dir.name)})</h2>")
    if preds_path.is_file() and att_path.is_file():
        with open(preds_path, newline="") as f:
            preds = list(csv.DictReader(f))
        attention = read_attention(att_path)
        last = f"prob_{classes[-1]}"
        preds.sort(key=lambda r: -float(r.get(last, 0) or 0))
        figs = []
        for row in preds:
            if len(figs) >= n_heatmaps:
                break
            sid = row["slide_id"]
            img = _heatmap(patches_dir, sid, attention[sid]) if sid in attention else None
            if img is None:
                continue
            probs = ", ".join(f"{c} {float(row[f'prob_{c}']):.3f}" for c in classes)
            label = classes[int(row["label"])]
            figs.append(
                f"<figure>{_img(img, max_px)}<figcaption>{html.escape(sid)}: label "
                f"{html.escape(label)}; out-of-fold {html.escape(probs)}</figcaption></figure>"
            )
        parts.append(
            "<p>Out-of-fold attention (percentile ranks; red = most attended), over the QC "
            f"thumbnail, for the slides most likely {html.escape(classes[-1])}.</p>"
            f"<div class='grid'>{''.join(figs)}</div>"
            if figs
            else "<p>No heatmap could be drawn (no attention saved for these slides).</p>"
        )
    else:
        parts.append(f"<p>No predictions.csv / attention.h5 in {html.escape(str(mil_dir))}.</p>")

    # patching QC
    counts: dict[str, int] = {}
    for r in status:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    parts.append(
        f"<h2 id='qc'>Patching QC</h2><p>{len(status)} slides ({html.escape(summary)})</p>"
    )
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(r.get(k, '')))}</td>" for k in ("slide_id", "status"))
        + f"<td>{html.escape(str(r.get('n_patches', '')))}</td>"
        + f"<td>{html.escape(str(r.get('reason', '')))}</td></tr>"
        for r in status
    )
    parts.append(
        "<table><tr><th>slide</th><th>status</th><th>patches</th><th>reason</th></tr>"
        f"{rows}</table>"
    )
    ordered = sorted(status, key=lambda r: r["status"] == "ok")  # failures first
    figs = []
    for r in ordered[:n_qc]:
        thumb = _read_rgb(patches_dir / "qc" / f"{r['slide_id']}.png")
        if thumb is not None:
            figs.append(
                f"<figure>{_img(thumb, max_px)}<figcaption>{html.escape(r['slide_id'])} "
                f"({html.escape(r['status'])})</figcaption></figure>"
            )
    parts.append(
        "<p>Tissue contours green, holes red, patches blue"
        + (f"; the first {n_qc} of {len(status)} slides" if len(status) > n_qc else "")
        + f".</p><div class='grid'>{''.join(figs)}</div></body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(parts))
    return out
