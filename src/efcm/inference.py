"""Inference with an exported package: features -> CLAM, or a whole slide -> patches -> student ->
CLAM.

One code path for `efcm predict` and the KServe predictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from efcm.config import PatchParams
from efcm.export import Package
from efcm.features import embed_batches
from efcm.heatmap import encode_png, gallery, overlay
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import SlideError, open_slide


@dataclass
class Prediction:
    probabilities: np.ndarray  # (C,) float32
    attention: np.ndarray  # (N,) float32, sums to 1
    label: str
    coords: np.ndarray | None = None  # (N, 2) int64 level-0 top-left, for slide input
    heatmap_png: bytes | None = None
    gallery_png: bytes | None = None  # the top-k and bottom-k attended patches


def check_features(features: np.ndarray, dim: int) -> np.ndarray:
    """Validate a bag: float, [N, dim], N >= 1, finite. Raises ValueError naming the expected
    shape."""
    arr = np.asarray(features)
    if arr.dtype.kind != "f":
        raise ValueError(f"features must be floating point (FP32 or FP16), got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"features must have shape [N, {dim}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"features must have shape [N, {dim}] with N >= 1: got an empty bag")
    if not np.isfinite(arr).all():
        raise ValueError("features contain NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def predict_features(pkg: Package, features: np.ndarray) -> Prediction:
    feats = check_features(features, pkg.feature_dim)
    with torch.inference_mode():
        out = pkg.clam(torch.from_numpy(feats))
    probs = out["probs"][0].numpy().astype(np.float32)
    return Prediction(
        probs, out["attention"].numpy().astype(np.float32), pkg.classes[int(probs.argmax())]
    )


def predict_slide(
    pkg: Package,
    uri: str | Path,
    *,
    mpp: float | None = None,
    batch_size: int = 64,
    heatmap: bool = False,
    gallery_k: int = 0,
) -> Prediction:
    """Patch the slide with the packaged settings, embed every patch with the student, run CLAM;
    with `heatmap`, the attention overlay PNG; with `gallery_k`, a PNG of the k most and least
    attended patches."""
    params = PatchParams.model_validate(pkg.meta["patch"])
    with open_slide(str(uri)) as slide:
        plan = plan_patches(slide, params, mpp_override=mpp, name=str(uri))
    if len(plan.coords) == 0:
        raise SlideError(f"{uri}: no tissue found", status="no_tissue")
    g = plan.geometry
    patches = SlidePatches(
        str(uri),
        CoordsFile(
            plan.coords, g.patch_level, g.read_size, g.patch_size, str(uri), g.step0, g.size0
        ),
    )
    batches = (
        torch.from_numpy(patches.read_batch(range(i, min(i + batch_size, len(patches)))))
        for i in range(0, len(patches), batch_size)
    )
    feats = embed_batches(pkg.encoder, batches, total=len(patches), desc="predict")
    pred = predict_features(pkg, feats)
    pred.coords = plan.coords
    if heatmap:
        pred.heatmap_png = encode_png(
            overlay(plan.thumbnail, plan.mask.scale, plan.coords, g.size0, pred.attention)
        )
    if gallery_k:
        pred.gallery_png = encode_png(gallery(patches.read, pred.attention, gallery_k))
    patches.close()
    return pred
