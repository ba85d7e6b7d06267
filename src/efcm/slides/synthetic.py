"""Synthetic H&E-like whole-slide images for tests, demos and benchmarks.

A slide is rendered tile by tile (memory stays bounded whatever its size) into a pyramidal, tiled,
JPEG TIFF with each level as its own top-level page and the mpp in the resolution tags, which
OpenSlide opens as vendor ``generic-tiff``. Tissue is a few smooth blobs on a near-white background:
pink stroma with purple nuclei, and each slide has its own stain (stroma and nuclear colour, nuclear
density and size vary a little from slide to slide, as between real slides). "Tumour" slides carry
one small lobed region (a few percent of the tissue, with at least the area of a couple of patches)
of the same tissue made more purple, with denser, larger, darker nuclei, plus a few tiny satellite
foci; or, for ``tumour_foci``, only a few tiny foci, each smaller than a patch. The ground truth is
written as a mask PNG. Everything is a function of the seed.
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
# Tumour relative to the slide's own normal tissue: ~3x as many nuclei, 1.5x as large, a little
# darker, and the stroma shifted towards purple. A subtler look is not learnt at all by the demo
# (a random-init teacher, CLAM trained on ~8 slides per fold): its AUC falls to chance.
_TUMOUR_NUCLEUS_SHIFT = np.array([-30, -25, -30], np.float32)
_TUMOUR_STROMA_SHIFT = np.array([-30, -26, 6], np.float32)
_TUMOUR_DENSITY = 3.0
_TUMOUR_RADIUS = 1.5
_STAIN_JITTER = 0.25  # how much each slide's stain varies (0: every slide alike)
_NUCLEI_PER_CELL = 40  # candidate nuclei per cell; normal tissue draws the first ~12
# A tumour region is at least a disc of this radius (level-0 px), so that it covers a whole patch
# of the usual sizes (256 level-0 px) wherever the patch grid falls; foci are far smaller.
_MIN_REGION_RADIUS = 224
_FOCUS_RADIUS = (32.0, 64.0)  # level-0 px
_FOCI = (2, 6)  # foci on a foci-only slide: at least, at most + 1
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
    tumour_area: float = 0.08  # of the tissue, for the region (it has a minimum size)
    tumour_foci: bool = False  # tumour only as a few tiny foci, each far smaller than a patch


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
        # the stain and the tumour draw from their own streams: the tissue and ink stay the same
        self._stain(np.random.default_rng([spec.seed, 17]))
        tumour = np.zeros_like(tissue)
        if spec.tumour and spec.tissue and (self.tissue > 0.5).any():
            tumour = self._tumour(np.random.default_rng([spec.seed, 19]), self.tissue > 0.5)
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

    def _stain(self, rng: np.random.Generator) -> None:
        """This slide's stain: colours, nuclear density and size vary a little between slides."""
        j = _STAIN_JITTER
        self.stroma = _STROMA + rng.normal(0, 8.0 * j, 3).astype(np.float32)
        self.nucleus = _NUCLEUS + rng.normal(0, 12.0 * j, 3).astype(np.float32)
        self.n_normal = round(12 * rng.uniform(1 - 0.4 * j, 1 + 0.4 * j))  # nuclei per cell
        self.radius_scale = float(rng.uniform(1 - 0.2 * j, 1 + 0.2 * j))
        self.tumour_stroma = self.stroma + _TUMOUR_STROMA_SHIFT
        self.tumour_nucleus = self.nucleus + _TUMOUR_NUCLEUS_SHIFT
        self.n_tumour = min(_NUCLEI_PER_CELL, round(self.n_normal * _TUMOUR_DENSITY))
        # below a pixel the nuclei are blended in by their share of the area (12 per cell: 0.18),
        # capped where they would overlap
        self.density = 0.18 * self.n_normal / 12 * self.radius_scale**2
        self.tumour_density = min(
            0.6, 0.18 * self.n_tumour / 12 * (self.radius_scale * _TUMOUR_RADIUS) ** 2
        )

    def _tumour(self, rng: np.random.Generator, inside: np.ndarray) -> np.ndarray:
        """The tumour field (mask px, 1 inside): one compact lobed region of about
        ``tumour_area`` of the tissue plus up to two tiny satellite foci, or only 2-5 tiny foci."""
        depth = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)
        field = np.zeros(inside.shape, np.float32)
        focus = np.array(_FOCUS_RADIUS) / MASK_DOWNSAMPLE
        n_foci = int(rng.integers(*_FOCI)) if self.spec.tumour_foci else int(rng.integers(0, 3))
        if not self.spec.tumour_foci:
            self._region(rng, field, inside, depth)
        ys, xs = np.nonzero(depth >= focus[1])  # foci lie inside the tissue, off its edge
        if not len(xs):
            ys, xs = np.nonzero(inside)
        for _ in range(n_foci):
            i = int(rng.integers(len(xs)))
            r = float(rng.uniform(*focus))
            field = np.maximum(field, self._disc(field.shape, xs[i], ys[i], r))
        return cv2.GaussianBlur(field, (0, 0), 1.0) * inside

    def _region(
        self, rng: np.random.Generator, field: np.ndarray, inside: np.ndarray, depth: np.ndarray
    ) -> None:
        """Grow a lobed region into ``field`` from a core disc (the minimum size) deep in the
        tissue, adding smaller lobes around it until it covers ``tumour_area`` of the tissue."""
        core = _MIN_REGION_RADIUS / MASK_DOWNSAMPLE
        ys, xs = np.nonzero(depth >= min(core + 1, depth.max()))
        i = int(rng.integers(len(xs)))
        centres = [(float(xs[i]), float(ys[i]), core)]
        field[:] = np.maximum(field, self._disc(field.shape, xs[i], ys[i], core))
        target = self.spec.tumour_area * inside.sum()
        for _ in range(200):  # bounded: a region hemmed in by the tissue edge stops growing
            if ((cv2.GaussianBlur(field, (0, 0), 1.0) > 0.5) & inside).sum() >= target:
                break
            cx, cy, cr = centres[int(rng.integers(len(centres)))]
            angle = rng.uniform(0, 2 * np.pi)
            x, y = cx + cr * np.cos(angle), cy + cr * np.sin(angle)
            iy, ix = (
                int(np.clip(y, 0, inside.shape[0] - 1)),
                int(np.clip(x, 0, inside.shape[1] - 1)),
            )
            if not inside[iy, ix]:  # lobes grow from inside the tissue only
                continue
            r = core * float(rng.uniform(0.4, 0.7))
            centres.append((x, y, r))
            field[:] = np.maximum(field, self._disc(field.shape, x, y, r))

    @staticmethod
    def _disc(shape: tuple[int, ...], x: float, y: float, r: float) -> np.ndarray:
        """1 inside the disc, 0 outside, at sub-pixel centre and radius."""
        gy, gx = np.ogrid[: shape[0], : shape[1]]
        return ((gx - x) ** 2 + (gy - y) ** 2 <= r * r).astype(np.float32)

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
        stroma = np.where(tumour[..., None], self.tumour_stroma, self.stroma)
        stroma = stroma + rng.normal(0, 6.0, (h, w, 3))
        img = np.where(tissue[..., None], stroma, img)
        if ds >= 8:  # nuclei below a pixel: blend their mean colour into the tissue
            dens = np.where(tumour, self.tumour_density, self.density)[..., None]
            nuc = np.where(tumour[..., None], self.tumour_nucleus, self.nucleus)
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
                n = _NUCLEI_PER_CELL
                pts = rng.uniform(0, _CELL, (n, 2)) + np.array([cx * _CELL, cy * _CELL])
                radii = rng.uniform(3.0, 5.0, n) * self.radius_scale
                shade = rng.normal(0, 10, (n, 3))
                for i, (px, py) in enumerate(pts):
                    lx, ly = int((px - x0) / ds), int((py - y0) / ds)
                    if not (0 <= lx < w and 0 <= ly < h) or not tissue[ly, lx]:
                        continue
                    is_tumour = bool(tumour[ly, lx])
                    if i >= (self.n_tumour if is_tumour else self.n_normal):
                        continue
                    r = radii[i] * (_TUMOUR_RADIUS if is_tumour else 1.0) / ds
                    color = (self.tumour_nucleus if is_tumour else self.nucleus) + shade[i]
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
    foci_fraction: float = 0.125,
    tumour_area: tuple[float, float] = (0.06, 0.10),
) -> Path:
    """Write the demo dataset: slides/, masks/ (tumour ground truth PNGs) and manifest.csv.

    Slides of one case share the label, so patient-level splits have something to respect. URIs in
    the manifest are relative to the manifest's folder. A tumour slide's region covers a share of
    its tissue drawn from ``tumour_area`` (a region has a minimum size, so small slides get more);
    ``foci_fraction`` of the tumour slides (at least one when there are two) carry only tiny foci.

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
    is_tumour = case_is_tumour[np.arange(n_slides) // slides_per_case]
    rng = np.random.default_rng([seed, 23])
    tumour_slides = np.nonzero(is_tumour)[0]
    n_foci = round(len(tumour_slides) * foci_fraction)
    n_foci = max(n_foci, 1) if len(tumour_slides) >= 2 and foci_fraction > 0 else n_foci
    foci = set(rng.permutation(tumour_slides)[:n_foci].tolist())
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
            tumour=bool(is_tumour[i]),
            seed=seed * 100_003 + i,
            tumour_area=float(rng.uniform(*tumour_area)),
            tumour_foci=i in foci,
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
