"""Opening slides with OpenSlide, resolving their mpp, and reading bounded thumbnails and patches.

Never reads a full-resolution level into memory: thumbnails are assembled from chunks at the best
pyramid level, so a single-level 100k x 100k slide costs no more than its thumbnail.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from openslide import lowlevel

from efcm.errors import InvalidSlide
from efcm.io.cache import SlideCache, local_path

log = logging.getLogger(__name__)

_CHUNK = 4096  # px at the read level, per read_region call when assembling a thumbnail
# openslide_read_region itself (ctypes: the GIL released) and openslide-python's own ARGB -> RGBA
# conversion, for `_read_rgba`: private names of openslide-python (1.3, 1.4), hence the fallback
# to the public read_region where they are missing (or the host is big-endian)
_READ_REGION = getattr(lowlevel, "_read_region", None) if sys.byteorder == "little" else None
_ARGB2RGBA = getattr(getattr(lowlevel, "_convert", None), "argb2rgba", None)
_UINT32_P = ctypes.POINTER(ctypes.c_uint32)


@dataclass(frozen=True)
class Mpp:
    value: float
    source: str  # override | openslide | tiff | objective_power | default


def open_slide(
    uri: str | Path, *, base_dir: str | Path | None = None, cache: SlideCache | None = None
) -> openslide.OpenSlide:
    """Open a slide by local path (relative ones from `base_dir`) or gs:// URI (staged once into
    `cache`, which a gs:// URI needs).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a gs:// URI with no `cache`, or an unsupported URI scheme.
        InvalidSlide: the file is not a slide OpenSlide can read (zero bytes, corrupt, unsupported,
        a folder).
    """
    path = local_path(str(uri), cache=cache, base_dir=base_dir)
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {uri}")
    if path.is_dir():
        raise InvalidSlide(f"{uri}: is a directory with no .dcm files, not a slide")
    if path.stat().st_size == 0:
        raise InvalidSlide(f"{uri}: empty file (0 bytes)")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise InvalidSlide(f"{uri}: not a slide format OpenSlide can read") from None
    except openslide.OpenSlideError as err:
        # OpenSlide's text can name other files (an MRXS data file, a DICOM instance): logged only
        log.warning("%s: %s: %s", uri, type(err).__name__, err)
        raise InvalidSlide(
            f"{uri}: corrupt or unreadable slide ({type(err).__name__}: cannot open)"
        ) from None


def _tiff_mpp(props: dict[str, str]) -> float | None:
    unit = props.get("tiff.ResolutionUnit", "").lower()
    try:
        xres = float(props["tiff.XResolution"])
    except (KeyError, ValueError):
        return None
    if xres <= 0:
        return None
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    return per_um / xres if per_um else None


def resolve_mpp(
    slide: openslide.OpenSlide,
    *,
    override: float | None = None,
    default: float | None = None,
    name: str = "slide",
) -> Mpp:
    """Microns per pixel at level 0; first match wins, and the source is recorded.

    Order: explicit override -> OpenSlide's mpp property -> TIFF resolution tags -> objective power
    (a labelled estimate, 20x = 0.5 um/px) -> `default` -> error saying how to supply it.
    """
    if override is not None and override > 0:
        return Mpp(float(override), "override")
    props = dict(slide.properties)
    try:
        v = float(props[openslide.PROPERTY_NAME_MPP_X])
        if v > 0:
            return Mpp(v, "openslide")
    except (KeyError, ValueError):
        pass
    v = _tiff_mpp(props)
    if v:
        return Mpp(v, "tiff")
    try:
        power = float(props[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
        if power > 0:
            return Mpp(10.0 / power, "objective_power")
    except (KeyError, ValueError):
        pass
    if default is not None:
        return Mpp(float(default), "default")
    raise InvalidSlide(
        f"{name}: no mpp (microns per pixel) in the slide's metadata. Supply it with an `mpp` "
        "column in the manifest or set `patch.default_mpp` in params.yaml.",
        status="no_mpp",
    )


def best_level(slide: openslide.OpenSlide, downsample: float) -> int:
    """The level with the largest downsample not above `downsample` (never read coarser than
    asked)."""
    ds = np.asarray(slide.level_downsamples)
    ok = np.nonzero(ds <= downsample * 1.01)[0]
    return int(ok[np.argmax(ds[ok])]) if len(ok) else 0


def read_thumbnail(
    slide: openslide.OpenSlide, downsample: float, max_px: int, *, workers: int = 1
) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB thumbnail at about `downsample`, longest side at most `max_px`, in bounded memory
    (a `_CHUNK` px square of the read level per thread at a time).

    `workers` threads read the chunks (OpenSlide releases the GIL; one handle serves several
    threads): the same pixels, each chunk read and resized as one thread would.

    Returns:
        (image (h, w, 3) uint8, (sx, sy) level-0 px per thumbnail px).
    """
    w0, h0 = slide.dimensions
    downsample = max(downsample, max(w0, h0) / max_px, 1.0)
    tw, th = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = best_level(slide, downsample)
    lds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    out = np.empty((th, tw, 3), np.uint8)
    scale = (w0 / lds) / tw  # level px per thumbnail px

    def chunk(lx: int, ly: int) -> None:
        cw, ch = min(_CHUNK, lw - lx), min(_CHUNK, lh - ly)
        x0, y0 = round(lx / scale), round(ly / scale)
        x1, y1 = min(tw, round((lx + cw) / scale)), min(th, round((ly + ch) / scale))
        if x1 > x0 and y1 > y0:
            tile = read_rgb(slide, (round(lx * lds), round(ly * lds)), level, (cw, ch))
            out[y0:y1, x0:x1] = cv2.resize(tile, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)

    starts = [(lx, ly) for ly in range(0, lh, _CHUNK) for lx in range(0, lw, _CHUNK)]
    if workers <= 1 or len(starts) == 1:
        for lx, ly in starts:
            chunk(lx, ly)
    else:
        with ThreadPoolExecutor(min(workers, len(starts)), thread_name_prefix="efcm-thumb") as ex:
            for done in [ex.submit(chunk, lx, ly) for lx, ly in starts]:
                done.result()  # re-raises a chunk's error
    return out, (w0 / tw, h0 / th)


def _read_rgba(
    slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]
) -> tuple[np.ndarray, bool]:
    """(pixels (h, w, 4) uint8, whether they are RGBA): `slide.read_region`'s pixels, read into a
    numpy buffer without the PIL image (and its copy into numpy) that read_region makes. Fully
    opaque, they are left as OpenSlide wrote them (premultiplied ARGB, B G R A in memory: RGB is
    the same bytes reordered); otherwise converted to RGBA by openslide-python's own function,
    the bytes read_region gives."""
    osr = getattr(slide, "_osr", None)
    w, h = size
    if _READ_REGION is None or _ARGB2RGBA is None or osr is None or w <= 0 or h <= 0:
        return np.asarray(slide.read_region(location, level, size)), True
    buf = np.empty((h, w), np.uint32)
    # OpenSlide's errors are raised by the function's errcheck, as read_region raises them
    _READ_REGION(osr, buf.ctypes.data_as(_UINT32_P), location[0], location[1], level, w, h)
    px = buf.view(np.uint8).reshape(h, w, 4)
    if (px[..., 3] == 255).all():
        return px, False
    _ARGB2RGBA(buf)
    return px, True


def read_rgb(
    slide: openslide.OpenSlide, location: tuple[int, int], level: int, size: tuple[int, int]
) -> np.ndarray:
    """read_region composited on white (transparent = outside the scanned area) -> (h, w, 3)
    uint8."""
    px, rgba = _read_rgba(slide, location, level, size)
    if not rgba:  # fully scanned, as OpenSlide wrote it: nothing to composite
        return cv2.cvtColor(px, cv2.COLOR_BGRA2RGB)
    out = cv2.cvtColor(px, cv2.COLOR_RGBA2RGB)
    clear = px[..., 3] != 255  # composited on white; an opaque pixel's value is its own
    if clear.any():
        sel = px[clear].astype(np.uint16)
        rgb, a = sel[:, :3], sel[:, 3:]
        out[clear] = ((rgb * a + 255 * (255 - a)) // 255).astype(np.uint8)
    return out
