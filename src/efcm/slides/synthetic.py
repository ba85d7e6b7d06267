"""Synthetic H&E-like whole-slide images for tests, demos and benchmarks.

A slide is rendered tile by tile (memory stays bounded whatever its size) into a pyramidal, tiled,
JPEG
TIFF with each level as its own top-level page and the mpp in the resolution tags, which OpenSlide
opens
as vendor ``generic-tiff``. Tissue is a few smooth blobs on a near-white background: pink stroma
with
purple nuclei. "Tumour" slides carry a few regions of a distinct texture (dense, large, dark
nuclei);
their ground truth is written as a mask PNG. Everything is a function of the seed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

log = logging.getLogger(__name__)

TILE = 256
MASK_DOWNSAMPLE = 16  # level-0 px per px of the tissue / tumour masks
_CELL = 128  # level-0 px: nuclei are generated per cell, so every level shows the same nuclei

_BACKGROUND = np.array([243, 241, 244], np.float32)
_STROMA = np.array([232, 166, 200], np.float32)
_NUCLEUS = np.array([92, 48, 142], np.float32)
_TUMOUR_NUCLEUS = np.array([60, 22, 105], np.float32)
_INK = {"green": (40, 150, 60), "blue": (40, 60, 170), "red": (190, 30, 40), "black": (20, 20, 20)}


@dataclass(frozen=True)
class SlideSpec:
    """What to draw. Sizes in level-0 px."""

    width: int
    height: int
    mpp: float | None = 0.5
    levels: int = 3
    level_factor: int = 4
    tumour: bool = False
    tissue: bool = True
    seed: int = 0
    ink: tuple[str, ...] = ()  # pen strokes next to the tissue: "green", "blue", "red", "black"


class _Scene:
    """The low-resolution fields every tile is rendered from."""

    def __init__(self, spec: SlideSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 7])
        mw = -(-spec.width // MASK_DOWNSAMPLE)
        mh = -(-spec.height // MASK_DOWNSAMPLE)
        tissue = np.zeros((mh, mw), np.float32)
        if spec.tissue:
            for _ in range(int(rng.integers(2, 5))):
                cx, cy = rng.uniform(0.25, 0.75) * mw, rng.uniform(0.25, 0.75) * mh
                ax, ay = rng.uniform(0.12, 0.25) * mw, rng.uniform(0.12, 0.25) * mh
                cv2.ellipse(
                    tissue,
                    (int(cx), int(cy)),
                    (int(ax), int(ay)),
                    float(rng.uniform(0, 180)),
                    0,
                    360,
                    1.0,
                    -1,
                )
        self.tissue = self._roughen(tissue, rng)
        tumour = np.zeros_like(tissue)
        if spec.tumour and spec.tissue:
            ys, xs = np.nonzero(self.tissue > 0.5)
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(len(xs)))
                r = rng.uniform(0.05, 0.1) * min(mw, mh)
                cv2.circle(tumour, (int(xs[i]), int(ys[i])), int(r), 1.0, -1)
            tumour = self._roughen(tumour, rng) * (self.tissue > 0.5)
        self.tumour = tumour.astype(np.float32)
        self._noise = np.random.default_rng([spec.seed, 13]).normal(0, 1, (TILE, TILE, 1))
        self.ink = np.zeros((mh, mw, 3), np.float32)
        self.ink_alpha = np.zeros((mh, mw), np.float32)
        # pen strokes run down the left edge of the tissue, a little apart from it and each other
        cols = np.nonzero((self.tissue > 0.5).any(0))[0]
        left = int(cols[0]) if len(cols) else mw // 2
        width = max(2, mw // 60)
        for k, name in enumerate(spec.ink):
            alpha = np.zeros((mh, mw), np.float32)
            x0 = max(width, left - (k + 1) * 3 * width)
            pts = np.array(
                [
                    [x0 + int(rng.uniform(-3, 3)), int(y)]
                    for y in np.linspace(0.15 * mh, 0.85 * mh, 8)
                ],
                np.int32,
            )
            cv2.polylines(alpha, [pts], False, 1.0, width)
            self.ink_alpha = np.maximum(self.ink_alpha, alpha)
            self.ink[alpha > 0] = _INK[name]

    @staticmethod
    def _roughen(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = field.shape
        noise = cv2.resize(
            rng.standard_normal((max(h // 8, 2), max(w // 8, 2))).astype(np.float32),
            (w, h),
            interpolation=cv2.INTER_CUBIC,
        )
        smooth = cv2.GaussianBlur(field, (0, 0), max(h, w) / 100 + 1)
        return np.clip(smooth + 0.15 * noise, 0, 1) if field.any() else field

    def _field(self, field: np.ndarray, x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        """Bilinear sample of a mask-resolution field over a level region (level px)."""
        gx = (x + np.arange(w) + 0.5) * ds / MASK_DOWNSAMPLE - 0.5
        gy = (y + np.arange(h) + 0.5) * ds / MASK_DOWNSAMPLE - 0.5
        mx, my = np.meshgrid(gx.astype(np.float32), gy.astype(np.float32))
        return cv2.remap(field, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def render(self, x: int, y: int, w: int, h: int, ds: float) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level region at (x, y), level px, where ds = level
        downsample."""
        rng = np.random.default_rng([self.spec.seed, int(x * ds), int(y * ds), int(ds)])
        if self._is_background(x, y, w, h, ds):  # most of a big slide: skip the per-pixel work
            bg = _BACKGROUND + self._noise[:h, :w] * 2.0
            return np.clip(bg, 0, 255).astype(np.uint8)
        tissue = self._field(self.tissue, x, y, w, h, ds) > 0.5
        tumour = (self._field(self.tumour, x, y, w, h, ds) > 0.5) & tissue
        img = np.empty((h, w, 3), np.float32)
        img[:] = _BACKGROUND
        img += rng.normal(0, 2.0, (h, w, 1))
        stroma = _STROMA + rng.normal(0, 6.0, (h, w, 3))
        img = np.where(tissue[..., None], stroma, img)
        if ds >= 8:  # nuclei below a pixel: blend their mean colour into the tissue
            dens = np.where(tumour, 0.55, 0.18)[..., None]
            nuc = np.where(tumour[..., None], _TUMOUR_NUCLEUS, _NUCLEUS)
            img = np.where(tissue[..., None], (1 - dens) * img + dens * nuc, img)
        else:
            img = self._draw_nuclei(img, x, y, w, h, ds, tissue, tumour)
        ink_a = self._field(self.ink_alpha, x, y, w, h, ds)[..., None]
        if ink_a.any():
            ink = np.stack([self._field(self.ink[..., c], x, y, w, h, ds) for c in range(3)], -1)
            a = np.clip(ink_a * 1.5, 0, 1)
            img = (1 - a) * img + a * ink
        return np.clip(img, 0, 255).astype(np.uint8)

    def _is_background(self, x: int, y: int, w: int, h: int, ds: float) -> bool:
        f = ds / MASK_DOWNSAMPLE
        x0, y0 = max(int(x * f) - 2, 0), max(int(y * f) - 2, 0)
        x1, y1 = int((x + w) * f) + 3, int((y + h) * f) + 3
        return (
            self.tissue[y0:y1, x0:x1].max(initial=0) < 0.45
            and self.ink_alpha[y0:y1, x0:x1].max(initial=0) == 0
        )

    def _draw_nuclei(
        self,
        img: np.ndarray,
        x: int,
        y: int,
        w: int,
        h: int,
        ds: float,
        tissue: np.ndarray,
        tumour: np.ndarray,
    ) -> np.ndarray:
        x0, y0 = x * ds, y * ds  # level-0 origin of the region
        c0x, c0y = int(x0 // _CELL) - 1, int(y0 // _CELL) - 1
        c1x, c1y = int((x0 + w * ds) // _CELL) + 1, int((y0 + h * ds) // _CELL) + 1
        img = np.ascontiguousarray(img)
        for cy in range(c0y, c1y + 1):
            for cx in range(c0x, c1x + 1):
                if cx < 0 or cy < 0:
                    continue
                rng = np.random.default_rng([self.spec.seed, 11, cx, cy])
                pts = rng.uniform(0, _CELL, (40, 2)) + np.array([cx * _CELL, cy * _CELL])
                radii = rng.uniform(3.0, 5.0, 40)
                shade = rng.normal(0, 10, (40, 3))
                for i, (px, py) in enumerate(pts):
                    lx, ly = int((px - x0) / ds), int((py - y0) / ds)
                    if not (0 <= lx < w and 0 <= ly < h) or not tissue[ly, lx]:
                        continue
                    is_tumour = bool(tumour[ly, lx])
                    if not is_tumour and i >= 12:  # normal tissue: sparse nuclei
                        continue
                    r = radii[i] * (1.8 if is_tumour else 1.0) / ds
                    color = (_TUMOUR_NUCLEUS if is_tumour else _NUCLEUS) + shade[i]
                    cv2.circle(img, (lx, ly), max(1, round(r)), color.tolist(), -1, cv2.LINE_AA)
        return img


def _tiles(scene: _Scene, lw: int, lh: int, ds: float) -> Iterator[np.ndarray]:
    for ty in range(0, lh, TILE):
        for tx in range(0, lw, TILE):
            tile = scene.render(tx, ty, min(TILE, lw - tx), min(TILE, lh - ty), ds)
            if tile.shape[:2] != (TILE, TILE):
                pad = np.full((TILE, TILE, 3), 255, np.uint8)
                pad[: tile.shape[0], : tile.shape[1]] = tile
                tile = pad
            yield tile


def write_slide(path: str | Path, spec: SlideSpec) -> dict[str, np.ndarray]:
    """Write one synthetic slide; returns its masks at 1/MASK_DOWNSAMPLE scale (`tissue`, `tumour`,
    `ink`).

    The file is written under a temporary name and renamed, so a killed writer leaves no half slide.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = _Scene(spec)
    tmp = path.with_name(path.name + ".part")
    extra = {}
    if spec.mpp is not None:
        px_per_cm = 1e4 / spec.mpp
        extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height > 2**29) as tif:
        for level in range(spec.levels):
            ds = spec.level_factor**level
            lw, lh = -(-spec.width // ds), -(-spec.height // ds)
            if level and min(lw, lh) < 64:
                break
            level_extra = dict(extra)
            if spec.mpp is not None and level:
                level_extra["resolution"] = (px_per_cm / ds, px_per_cm / ds)
            tif.write(
                _tiles(scene, lw, lh, float(ds)),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                subfiletype=1 if level else 0,
                metadata=None,
                **level_extra,
            )
    tmp.replace(path)
    return {
        "ink": (scene.ink_alpha > 0).astype(np.uint8),
        "tissue": (scene.tissue > 0.5).astype(np.uint8),
        "tumour": (scene.tumour > 0.5).astype(np.uint8),
    }


def write_demo_dataset(
    out_dir: str | Path,
    n_slides: int = 16,
    *,
    seed: int = 0,
    size: int = 4096,
    mpp: float = 0.5,
    levels: int = 3,
    level_factor: int = 4,
    slides_per_case: int = 2,
    tumour_fraction: float = 0.5,
    classes: tuple[str, str] = ("normal", "tumour"),
) -> Path:
    """Write the demo dataset: slides/, masks/ (tumour ground truth PNGs) and manifest.csv.

    Slides of one case share the label, so patient-level splits have something to respect. URIs in
    the manifest are relative to the manifest's folder.

    Returns:
        The manifest path.
    """
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    n_cases = -(-n_slides // slides_per_case)
    n_tumour_cases = max(1, min(n_cases - 1, round(n_cases * tumour_fraction)))
    case_is_tumour = np.zeros(n_cases, bool)
    case_is_tumour[np.random.default_rng(seed).permutation(n_cases)[:n_tumour_cases]] = True
    rows = []
    for i in range(n_slides):
        case = i // slides_per_case
        slide_id = f"slide_{i:03d}"
        spec = SlideSpec(
            width=size,
            height=size,
            mpp=mpp,
            levels=levels,
            level_factor=level_factor,
            tumour=bool(case_is_tumour[case]),
            seed=seed * 100_003 + i,
        )
        masks = write_slide(out / "slides" / f"{slide_id}.tif", spec)
        cv2.imwrite(str(out / "masks" / f"{slide_id}.png"), masks["tumour"] * 255)
        rows.append(
            {
                "slide_id": slide_id,
                "case_id": f"case_{case:03d}",
                "uri": f"slides/{slide_id}.tif",
                "label": classes[int(spec.tumour)],
            }
        )
        log.info("wrote %s (%s)", slide_id, rows[-1]["label"])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "case_id", "uri", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
