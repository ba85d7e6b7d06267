"""Synthetic image demo sets, deterministic from a seed (`efcm demo-data OUT --kind fundus|cxr`).

**fundus**: colour fundus-like photographs (JPEG, every fourth PNG): a circular field of view on
black (a fifth of them larger than the picture, so the circle is clipped at the top and bottom),
an optic disc on the left or right (the eye), a darker macula, a branching vessel tree from the
disc, and lesion spots (microaneurysm-like red dots, haemorrhage-like blotches, a few exudate-like
yellow dots) whose presence is the label: with two classes, none vs some (3-14 spots); with more,
the grade by count (class g: 5 (g-1) + 1 to 5 g spots). Every image has blood-vessel crossings,
brightness and colour variation, and glare spots, so a lesion is a small local change, learnable
but not trivial.

**cxr**: grey chest-X-ray-like images: the body, two lung fields, the mediastinum and heart,
ribs, clavicles and spine, with multi-label findings each drawn where a radiologist would look:
`effusion` (fluid in a lower lung with a meniscus, blunting the costophrenic angle),
`nodule` (one or two round opacities in a lung), `cardiomegaly` (a heart wider than half the
chest instead of ~0.42 of it). Written in turn as 8-bit PNG, 16-bit PNG (12 bits used), DICOM
MONOCHROME2 and DICOM MONOCHROME1 (inverted stored values), the DICOMs with a rescale intercept
and a window centre/width, so that every decoding path of `efcm.images.decode` is exercised.

Both write `OUT/images/<image_id>.<ext>` and `OUT/manifest.csv` (relative URIs), with
`images_per_case` images per `case_id` (both eyes, several views) and the first `unlabelled`
images without a label (for distillation). Each image's pixels come from its own generator,
seeded by (seed, kind, index): the anatomy and the findings draw from separate streams, so an
image with and without its findings differs only where they are drawn.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from efcm.images.dicom import write_dicom
from efcm.io.image_manifest import ImageEntry, write_image_manifest

log = logging.getLogger(__name__)

CXR_FINDINGS = ("effusion", "nodule", "cardiomegaly")  # what the CXR generator can draw
KIND_CODE = {"fundus": 1, "cxr": 2}
JPEG_QUALITY = 92


@dataclass(frozen=True)
class Streams:
    """The two random streams of one image: its anatomy, and its findings."""

    anatomy: np.random.Generator
    findings: np.random.Generator


def streams(seed: int, kind: str, index: int) -> Streams:
    a, f = np.random.SeedSequence([seed, KIND_CODE[kind], index]).spawn(2)
    return Streams(np.random.default_rng(a), np.random.default_rng(f))


# -- fundus ---------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]."""
    small = rng.standard_normal((max(2, round(h / scale)), max(2, round(w / scale))))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(-2.5, 2.5) / 2.5


def _vessel(
    img: np.ndarray,
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    width: float,
    length: float,
    colour: tuple[float, float, float],
    depth: int = 0,
) -> None:
    """A vessel: a wandering polyline that thins and branches (recursively)."""
    x, y = start
    step = max(2.0, length / 24)
    travelled = 0.0
    while travelled < length and width > 0.6:
        angle += rng.normal(0, 0.12)
        nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
        cv2.line(
            img,
            (round(x * 4), round(y * 4)),
            (round(nx * 4), round(ny * 4)),
            colour,
            max(1, round(width)),
            cv2.LINE_AA,
            shift=2,
        )
        x, y, travelled = nx, ny, travelled + step
        if depth < 3 and rng.random() < 0.07:
            side = rng.choice([-1, 1])
            _vessel(
                img,
                rng,
                (x, y),
                angle + side * rng.uniform(0.4, 0.9),
                width * 0.7,
                (length - travelled) * 0.7,
                colour,
                depth + 1,
            )
            width *= 0.85
        width *= 0.985


def fundus_image(
    s: Streams, size: int, *, n_lesions: int, clipped: bool
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """One fundus-like RGB image (size x round(1.25 size)) and the centres of its lesions."""
    rng = s.anatomy
    h, w = size, round(size * 1.25)
    r = size * (rng.uniform(0.56, 0.62) if clipped else rng.uniform(0.42, 0.47))
    cx = w / 2 + rng.uniform(-0.04, 0.04) * size
    cy = h / 2 + rng.uniform(-0.03, 0.03) * size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dist = np.hypot(xx - cx, yy - cy) / r
    base = np.array([rng.uniform(165, 215), rng.uniform(65, 105), rng.uniform(25, 50)], np.float32)
    vignette = 1.0 - 0.35 * dist**2
    texture = 1.0 + 0.06 * _smooth_noise(rng, h, w, size / 10)
    img = base[None, None, :] * (vignette * texture)[..., None]
    # the macula, darker, and the optic disc, bright, on either side (left or right eye)
    side = rng.choice([-1.0, 1.0])
    mx, my = cx - side * 0.42 * r, cy + rng.uniform(-0.05, 0.05) * r
    img *= (1.0 - 0.25 * np.exp(-(((xx - mx) ** 2 + (yy - my) ** 2) / (2 * (0.12 * r) ** 2))))[
        ..., None
    ]
    dx, dy = cx + side * 0.36 * r, cy + rng.uniform(-0.06, 0.06) * r
    disc = np.exp(-((((xx - dx) / (0.11 * r)) ** 2 + ((yy - dy) / (0.13 * r)) ** 2) ** 2))
    img = img * (1 - disc[..., None]) + np.array([250, 215, 150], np.float32) * disc[..., None]
    # the vessel tree: arcades above and below the macula, and nasal branches
    vessels = np.zeros((h, w, 3), np.float32)
    width0 = max(1.5, size / 110)
    for a in (-0.55, 0.55, -1.4, 1.4):
        heading = (math.pi if side > 0 else 0.0) + (a if side > 0 else -a)
        if abs(a) > 1:
            heading = math.pi - heading  # nasal: away from the macula
        _vessel(
            vessels,
            rng,
            (dx, dy),
            heading + rng.normal(0, 0.1),
            width0 * rng.uniform(0.8, 1.1),
            r * rng.uniform(0.9, 1.3),
            (1.0, 1.0, 1.0),
        )
    vessels = cv2.GaussianBlur(vessels, (0, 0), 0.6)
    vessel_colour = np.array([120, 30, 18], np.float32)
    img = img * (1 - 0.7 * vessels) + vessel_colour * 0.7 * vessels
    # glare: bright, soft reflections in every image (a distractor for the lesion detector)
    for _ in range(rng.integers(0, 3)):
        gx, gy = cx + rng.uniform(-0.6, 0.6) * r, cy + rng.uniform(-0.6, 0.6) * r
        glare = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (rng.uniform(3, 8)) ** 2))
        img += 40 * glare[..., None]
    img *= rng.uniform(0.8, 1.1)  # exposure
    centres = _draw_lesions(img, s.findings, n_lesions, (cx, cy, r), (dx, dy))
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)  # sensor noise
    img[dist > 1.0] = rng.uniform(0, 6)  # black outside the field of view
    return np.clip(img, 0, 255).astype(np.uint8), centres


def _draw_lesions(
    img: np.ndarray,
    rng: np.random.Generator,
    n: int,
    fov: tuple[float, float, float],
    disc: tuple[float, float],
) -> list[tuple[int, int]]:
    """Microaneurysms, haemorrhages and exudates at `n` places in the field of view, off the
    disc; returns their centres."""
    cx, cy, r = fov
    h, w = img.shape[:2]
    centres = []
    while len(centres) < n:
        rho, phi = r * 0.8 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        x, y = cx + rho * math.cos(phi), cy + rho * math.sin(phi)
        if (
            not (2 <= x < w - 2 and 2 <= y < h - 2)
            or math.hypot(x - disc[0], y - disc[1]) < 0.2 * r
        ):
            continue
        kind = rng.choice(["micro", "haem", "exudate"], p=[0.5, 0.35, 0.15])
        size = h / 256
        if kind == "micro":
            rad, colour = rng.uniform(1.5, 2.5) * size, (95, 15, 10)
        elif kind == "haem":
            rad, colour = rng.uniform(3.0, 6.0) * size, (110, 25, 15)
        else:
            rad, colour = rng.uniform(1.5, 3.0) * size, (235, 215, 120)
        rad = max(rad, 1.0)  # visible on the smallest pictures too
        spot = np.zeros(img.shape[:2], np.float32)
        axes = (round(rad * 4), round(rad * rng.uniform(0.7, 1.0) * 4))
        centre, angle = (round(x * 4), round(y * 4)), rng.uniform(0, 180)
        cv2.ellipse(spot, centre, axes, angle, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
        spot = cv2.GaussianBlur(spot, (0, 0), 0.7)[..., None]
        img[:] = img * (1 - 0.85 * spot) + np.array(colour, np.float32) * 0.85 * spot
        centres.append((round(x), round(y)))
    return centres


def fundus_lesions(rng: np.random.Generator, grade: int, grades: int) -> int:
    """Lesion count of a grade: 0 for grade 0; binary tasks 3-14; graded, 5 (g-1) + 1 to 5 g."""
    if grade == 0:
        return 0
    if grades == 2:
        return int(rng.integers(3, 15))
    return int(rng.integers(5 * (grade - 1) + 1, 5 * grade + 1))


# -- chest X-ray ----------------------------------------------------------------------------------


def _ellipse_mask(h: int, w: int, centre, axes, angle: float = 0.0) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    c = (round(centre[0] * 4), round(centre[1] * 4))
    a = (max(1, round(axes[0] * 4)), max(1, round(axes[1] * 4)))
    cv2.ellipse(m, c, a, angle, 0, 360, 1.0, -1, cv2.LINE_AA, shift=2)
    return m


def cxr_image(s: Streams, size: int, findings: tuple[str, ...]) -> np.ndarray:
    """One chest-X-ray-like image: float32 (size, size) in [0, 1], bright = dense."""
    rng, frng = s.anatomy, s.findings
    h = w = size
    # the patient's build and position: a whole-image scale, rotation and shift (drawn first, so
    # the same with or without findings); without them every chest would sit on the same pixels
    pose = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-5, 5), rng.uniform(0.88, 1.08))
    pose[:, 2] += rng.uniform(-0.06, 0.06, 2) * size
    img = np.full((h, w), 0.06, np.float32)  # air around the body
    cx = w / 2 + rng.uniform(-0.02, 0.02) * w
    body = _ellipse_mask(h, w, (cx, 0.62 * h), (0.46 * w, 0.62 * h))
    img += 0.38 * cv2.GaussianBlur(body, (0, 0), w / 60)
    # the lungs: darker fields either side of the mediastinum, domed at the bottom
    lung_w, lung_h = rng.uniform(0.16, 0.21) * w, rng.uniform(0.28, 0.35) * h
    top = rng.uniform(0.14, 0.18) * h
    lungs = []
    for sign in (-1, 1):
        lx = cx + sign * rng.uniform(0.2, 0.23) * w
        lungs.append((lx, _ellipse_mask(h, w, (lx, top + lung_h), (lung_w, lung_h))))
    lung_all = np.clip(lungs[0][1] + lungs[1][1], 0, 1)
    # the heart: lower centre, to the patient's left (image right); its width is the finding
    chest = 2 * (0.21 * w + lung_w)
    ratio = rng.uniform(0.5, 0.64) if "cardiomegaly" in findings else rng.uniform(0.36, 0.5)
    heart_w = ratio * chest / 2
    hx, hy = cx + 0.04 * w, top + 1.65 * lung_h
    heart = _ellipse_mask(h, w, (hx, hy), (heart_w, 0.14 * h), rng.uniform(-12, -4))
    mediastinum = _ellipse_mask(h, w, (cx, top + 0.7 * lung_h), (0.07 * w, 0.6 * lung_h))
    dense = np.clip(heart + mediastinum, 0, 1)
    lung_all = lung_all * (1 - dense)
    img -= 0.26 * cv2.GaussianBlur(lung_all, (0, 0), w / 120)
    img += 0.12 * cv2.GaussianBlur(dense, (0, 0), w / 150)
    # bones: spine, ribs (arcs over each lung), clavicles
    bone = np.zeros((h, w), np.float32)
    cv2.rectangle(bone, (round(cx - 0.025 * w), 0), (round(cx + 0.025 * w), h), 0.5, -1)
    thick = max(1, round(w / 90))
    for sign in (-1, 1):
        for k in range(9):  # posterior ribs: arches from the spine, out and down
            y0 = top + 0.06 * h + k * lung_h * 0.2
            centre = (round((cx + sign * 0.02 * w) * 4), round(y0 * 4))
            axes = (round(0.27 * w * 4), round(0.07 * h * 4))
            start, end = (270, 370) if sign > 0 else (170, 270)
            cv2.ellipse(bone, centre, axes, 0, start, end, 1.0, thick, cv2.LINE_AA, shift=2)
        clav = ((cx + sign * 0.04 * w, top - 0.01 * h), (cx + sign * 0.3 * w, top - 0.05 * h))
        p0 = (round(clav[0][0]), round(clav[0][1]))
        p1 = (round(clav[1][0]), round(clav[1][1]))
        cv2.line(bone, p0, p1, 1.0, thick + 1, cv2.LINE_AA)
    img += 0.1 * cv2.GaussianBlur(bone, (0, 0), 0.8) * body * (1 - 0.6 * dense)
    # findings, from their own stream: the anatomy is the same with or without them
    if "effusion" in findings:
        lx, lung = lungs[int(frng.integers(2))]
        bottom = top + 2 * lung_h
        depth = frng.uniform(0.12, 0.45) * lung_h
        lateral = np.clip(np.abs(np.arange(w) - cx) - abs(lx - cx) + lung_w, 0, None) / (2 * lung_w)
        level = bottom - depth - 0.25 * lung_h * lateral**2  # the meniscus climbs laterally
        fluid = (np.arange(h)[:, None] > level[None, :]).astype(np.float32) * lung * (1 - dense)
        img += frng.uniform(0.14, 0.26) * cv2.GaussianBlur(fluid, (0, 0), w / 200)
    if "nodule" in findings:
        for _ in range(int(frng.integers(1, 3))):
            lx, lung = lungs[int(frng.integers(2))]
            ys, xs = np.nonzero(lung > 0.99)
            j = int(frng.integers(len(ys)))
            rad = frng.uniform(0.018, 0.035) * w
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            blob = np.exp(-((xx - xs[j]) ** 2 + (yy - ys[j]) ** 2) / (2 * (rad / 1.6) ** 2))
            img += 0.2 * blob
    img = cv2.warpAffine(img, pose, (w, h), flags=cv2.INTER_LINEAR, borderValue=0.06)
    img += rng.normal(0, 0.012, img.shape).astype(np.float32)  # quantum noise
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.04, 0.04)  # exposure
    return np.clip(img, 0, 1)


# -- the datasets ---------------------------------------------------------------------------------


def _cases(n: int, per_case: int) -> list[str]:
    return [f"case{i // per_case:04d}" for i in range(n)]


def _write_png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img[..., ::-1] if img.ndim == 3 else img)
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    path.write_bytes(buf.tobytes())


@dataclass(frozen=True)
class DemoSpec:
    """What a demo set holds (params `image.demo`, and the task's classes)."""

    images: int
    seed: int
    classes: tuple[str, ...]
    size: int = 256
    images_per_case: int = 2
    positive_fraction: float = 0.5
    none_label: str = "no_finding"  # cxr: the label of an image without findings
    unlabelled: int = 0


def _fundus_item(labels: np.random.Generator, spec: DemoSpec, i: int, path: Path) -> str:
    """Write fundus image `i` at `path` + its suffix (every fourth PNG, else JPEG); its label."""
    grade = (
        int(labels.integers(1, len(spec.classes)))
        if labels.random() < spec.positive_fraction
        else 0
    )
    s = streams(spec.seed, "fundus", i)
    n = fundus_lesions(s.findings, grade, len(spec.classes))
    img, _ = fundus_image(s, spec.size, n_lesions=n, clipped=i % 5 == 3)
    if i % 4 == 1:
        _write_png(path.with_suffix(".png"), img)
    else:
        _, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        path.with_suffix(".jpg").write_bytes(buf.tobytes())
    return spec.classes[grade]


def cxr_findings(rng: np.random.Generator, classes: tuple[str, ...], p: float) -> tuple[str, ...]:
    """Each class present with probability `p`, independently."""
    return tuple(c for c in classes if rng.random() < p)


def _cxr_item(labels: np.random.Generator, spec: DemoSpec, i: int, path: Path) -> str:
    """Write CXR image `i` at `path` + its suffix (the four forms in turn); its label."""
    found = cxr_findings(labels, spec.classes, spec.positive_fraction)
    x = cxr_image(streams(spec.seed, "cxr", i), spec.size, found)
    _write_cxr(path, x, i % 4, f"efcm-demo-{spec.seed}-{path.name}")
    return "|".join(found) or spec.none_label


def write_demo_images(out_dir: str | Path, kind: str, spec: DemoSpec) -> Path:
    """Write the `kind` (fundus, cxr) demo set (see the module docstring); returns the
    manifest's path.

    Raises:
        ValueError: an unknown kind, or a CXR class the generator cannot draw.
    """
    if kind not in KIND_CODE:
        raise ValueError(f"unknown image demo kind {kind!r}; known: {list(KIND_CODE)}")
    unknown = [c for c in spec.classes if c not in CXR_FINDINGS]
    if kind == "cxr" and unknown:
        raise ValueError(
            f"the CXR demo draws {list(CXR_FINDINGS)}: it cannot draw {unknown} (image.classes)"
        )
    item = _fundus_item if kind == "fundus" else _cxr_item
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng([spec.seed, KIND_CODE[kind]])
    entries = []
    for i, case in enumerate(_cases(spec.images, spec.images_per_case)):
        image_id = f"{case}_{i % spec.images_per_case}"
        label = item(labels, spec, i, out / "images" / image_id)
        (name,) = (p.name for p in (out / "images").glob(f"{image_id}.*"))
        entries.append(
            ImageEntry(image_id, case, f"images/{name}", "" if i < spec.unlabelled else label)
        )
    log.info("%s demo: %d images in %s", kind, spec.images, out)
    return write_image_manifest(out / "manifest.csv", entries).path


def _write_cxr(path: Path, x: np.ndarray, form: int, uid_seed: str) -> None:
    """`x` (float, [0, 1]) at `path` + its suffix as form 0: 8-bit PNG, 1: 16-bit PNG (12 bits),
    2: DICOM MONOCHROME2, 3: DICOM MONOCHROME1."""
    if form == 0:
        _write_png(path.with_suffix(".png"), np.rint(x * 255).astype(np.uint8))
        return
    stored = np.rint(x * 4095).astype(np.uint16)
    if form == 1:
        _write_png(path.with_suffix(".png"), stored)
        return
    intercept = -1024.0  # stored 0..4095 -> -1024..3071, as a CT-like modality LUT would
    lo, hi = np.percentile(stored, [1, 99.5]) + intercept
    window = (float(np.rint((lo + hi) / 2)), float(np.rint(hi - lo)) + 1)
    if form == 3:
        stored = 4095 - stored  # MONOCHROME1: dense is low; the reader inverts it back
        window = (float(4095 + 2 * intercept - window[0]), window[1])
    photometric = "MONOCHROME1" if form == 3 else "MONOCHROME2"
    write_dicom(
        path.with_suffix(".dcm"),
        stored,
        photometric=photometric,
        window=window,
        rescale=(1.0, intercept),
        uid_seed=uid_seed,
    )
