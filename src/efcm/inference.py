"""Inference with an exported package: features -> CLAM; patch pixels -> student -> CLAM; or a
whole slide -> patches -> student -> CLAM (+ heatmap PNG, + attention GeoJSON). An image package
(`kind: image`): one image (an encoded file, or its pixels) -> the package's preprocessing ->
student -> fold heads (`predict_image`).

One code path for `efcm predict` and the KServe predictor, whatever runtime serves the package
(`efcm.runtimes`: torch, onnx or int8): this module imports no torch, so a CPU server without torch
runs it. The limits a server sets
(`efcm.limits.ServingLimits`) are arguments here: a bag over `max_patches` or a slide over
`max_slide_bytes` raises `TooLarge`, and a slide still running at `deadline` (a
`time.monotonic()` value) stops between batches with `Deadline`; `efcm predict` passes
none of them.

Patch reading overlaps the encoder: `read_workers` threads read and resize whole batches
(OpenSlide and OpenCV release the GIL, and one OpenSlide handle is safe to share between threads;
a row of adjacent patches is one read, `SlidePatches.read_batch`) `READ_AHEAD` batches each ahead
of the runtime's `embed` (for torch, `efcm.features.embed_batches`, the extraction engine's
encoder loop). The readers run on the cores the runtime leaves and in its idle moments (the ONNX
runtimes' threads sleep rather than spin while they wait), which `efcm.limits.RuntimeSettings`
sizes: benchmarks/serving.py measures the features step of a request against the same runtime
on the same patches already in memory. Threads, not the engine's DataLoader worker processes: a
server process runs gRPC's threads, and forking it per request is unsafe, while spawning workers
would cost seconds per request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide

from efcm.config import ImageParams, PatchParams
from efcm.errors import Deadline, InvalidInput, InvalidSlide, InvalidTensor, TooLarge
from efcm.evaluation import geojson
from efcm.evaluation.heatmap import DEFAULT_SIZE, check_size, encode_png, gallery, render
from efcm.io.cache import SlideCache, staged
from efcm.io.package import IMAGE, SLIDE
from efcm.runtimes import Runtime
from efcm.slides.batch import plan_patches
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    probabilities: np.ndarray  # (C,) float32
    attention: np.ndarray  # (N,) float32, sums to 1
    label: str | list[str]  # a list of the called classes for a multi-label image package
    coords: np.ndarray | None = None  # (N, 2) int64 level-0 top-left, for slide input
    heatmap_png: bytes | None = None  # longest side: the requested heatmap size, legend included
    heatmap_geojson: bytes | None = None  # JSON text: a QuPath tile per patch (evaluation.geojson)
    gallery_png: bytes | None = None  # the top-k and bottom-k attended patches
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step (slide input)
    downloaded_bytes: int = 0  # bytes staged from gs:// for this prediction


def check_features(features: np.ndarray, dim: int) -> np.ndarray:
    """Validate a bag: float, [N, dim], N >= 1, finite. Raises InvalidTensor (a client error: what
    was sent cannot be a bag) naming the expected shape."""
    arr = np.asarray(features)
    if arr.dtype.kind != "f":
        raise InvalidTensor(f"features must be floating point (FP32 or FP16), got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidTensor(f"features must have shape [N, {dim}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidTensor(f"features must have shape [N, {dim}] with N >= 1: got an empty bag")
    if not np.isfinite(arr).all():
        raise InvalidTensor("features contain NaN or infinite values")
    return arr.astype(np.float32, copy=False)


def _check_count(n: int, max_patches: int | None, what: str) -> None:
    if max_patches is not None and n > max_patches:
        raise TooLarge(f"{what}: {n} patches, over the limit of {max_patches} per request")


def predict_features(
    rt: Runtime, features: np.ndarray, *, max_patches: int | None = None
) -> Prediction:
    """CLAM on a bag of student features [N, D]."""
    feats = check_features(features, rt.feature_dim)
    _check_count(len(feats), max_patches, "features")
    probs, attention = rt.head(feats)
    return Prediction(probs, attention, rt.label_of(probs))


def check_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """Validate patch pixels: uint8 [N, size, size, 3], N >= 1. Raises InvalidTensor naming the
    expected shape."""
    arr = np.asarray(patches)
    want = f"[N, {size}, {size}, 3] (N >= 1 patches, UINT8 RGB)"
    if arr.dtype != np.uint8:
        raise InvalidTensor(f"patches must be UINT8, got {arr.dtype}; expected {want}")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (size, size, 3):
        raise InvalidTensor(f"patches must have shape {want}, got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidTensor(f"patches: got an empty bag; expected {want}")
    return arr


def _check_time(deadline: float | None, step: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise Deadline(f"the request ran past its time budget (during {step})")


def predict_patches(
    rt: Runtime,
    patches: np.ndarray,
    *,
    batch_size: int = 64,
    max_patches: int | None = None,
    deadline: float | None = None,
) -> Prediction:
    """The student embeds patch pixels uint8 [N, S, S, 3] (S = the packaged patch size), then
    CLAM."""
    check_kind(rt, SLIDE, "patches")
    arr = check_patches(patches, rt.patch_size)
    _check_count(len(arr), max_patches, "patches")

    def batches() -> Iterator[np.ndarray]:
        for i in range(0, len(arr), batch_size):
            _check_time(deadline, "feature extraction")
            yield np.ascontiguousarray(arr[i : i + batch_size])

    feats = rt.embed(batches(), total=len(arr), desc="predict")
    return predict_features(rt, feats)


def image_params(rt: Runtime) -> ImageParams:
    """The image params an image package was exported with (its preprocessing and limits)."""
    return ImageParams.model_validate(rt.meta["params"]["image"])


SERVES = {
    IMAGE: "one image: input 'image' (an encoded PNG, JPEG, TIFF or DICOM file, or its pixels)",
    SLIDE: "a slide: input 'features', 'patches' or 'slide_uri'",
}


def check_kind(rt: Runtime, kind: str, what: str) -> None:
    """InvalidInput when `what` (an input) is not for this package's kind."""
    if rt.kind != kind:
        raise InvalidInput(
            f"{what} is for {_a(kind)} package; this is {_a(rt.kind)} package, it takes "
            f"{SERVES[rt.kind]}"
        )


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def image_pixels(image: bytes | np.ndarray, params: ImageParams, name: str) -> np.ndarray:
    """An encoded image file (PNG, JPEG, TIFF, DICOM) or its decoded pixels, uint8 (H, W, 3) RGB
    or (H, W) grey -> the preprocessed uint8 (size, size, 3) array, exactly as the batch stages
    prepare a manifest's image (`efcm.images.reader.load_image`, `preprocess`).

    Raises:
        InvalidImage: not an image, corrupt, outside the size limits, no field of view.
        InvalidTensor: pixels that are not uint8 (H, W, 3) or (H, W).
    """
    from efcm.images.pixels import check_size
    from efcm.images.preprocess import preprocess
    from efcm.images.reader import load_image

    if isinstance(image, bytes | bytearray):
        return load_image(bytes(image), name, params)
    arr = np.asarray(image)
    want = "UINT8 [H, W, 3] RGB or [H, W] grey pixels"
    if arr.dtype != np.uint8:
        raise InvalidTensor(f"{name}: pixels must be UINT8, got {arr.dtype}; expected {want}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise InvalidTensor(f"{name}: pixels of shape {list(arr.shape)}; expected {want}")
    h, w = arr.shape[:2]
    check_size(w, h, name, max_pixels=params.max_pixels, min_side=params.min_side)
    return preprocess(np.ascontiguousarray(arr), params, name)


def predict_image(
    rt: Runtime, image: bytes | np.ndarray, *, name: str = "image", deadline: float | None = None
) -> Prediction:
    """One image through an image package: its preprocessing (`image_pixels`), the student, the
    fold heads; the label is the package's call (`label_of`: a class, or for a multi-label task
    the list of classes at or over their thresholds). `name` names the image in errors.

    Raises:
        InvalidInput: a slide package; InvalidImage / InvalidTensor: see `image_pixels`.
    """
    check_kind(rt, IMAGE, "an image")
    pixels = image_pixels(image, image_params(rt), name)
    _check_time(deadline, "image preprocessing")
    feats = rt.embed([pixels[None]], total=1, desc="predict")
    probs, attention = rt.head(feats)
    return Prediction(probs, attention, rt.label_of(probs))


READ_AHEAD = 2  # batches in flight per reader thread (read, or done and waiting for the runtime)


def _read_ahead(
    patches: SlidePatches, batch_size: int, workers: int, deadline: float | None
) -> Iterator[np.ndarray]:
    """uint8 batches in order, read by `workers` threads up to READ_AHEAD x workers batches
    ahead."""
    starts = range(0, len(patches), batch_size)
    if workers <= 0:
        for i in starts:
            _check_time(deadline, "patch reading")
            yield patches.read_batch(range(i, min(i + batch_size, len(patches))))
        return
    patches.slide  # noqa: B018  (open the shared handle once, before the threads)
    pending: deque[Future] = deque()
    todo = iter(starts)
    with ThreadPoolExecutor(workers, thread_name_prefix="efcm-read") as pool:
        try:
            for i in todo:
                pending.append(
                    pool.submit(patches.read_batch, range(i, min(i + batch_size, len(patches))))
                )
                if len(pending) >= READ_AHEAD * workers:
                    break
            while pending:
                _check_time(deadline, "feature extraction")
                batch = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(
                        pool.submit(
                            patches.read_batch, range(nxt, min(nxt + batch_size, len(patches)))
                        )
                    )
                yield batch
        finally:
            for f in pending:
                f.cancel()


def predict_slide(
    rt: Runtime,
    uri: str | Path,
    *,
    mpp: float | None = None,
    batch_size: int = 64,
    read_workers: int = 2,
    heatmap: bool = False,
    heatmap_size: int = DEFAULT_SIZE,
    geojson_out: bool = False,
    gallery_k: int = 0,
    max_patches: int | None = None,
    max_slide_bytes: int | None = None,
    cache: SlideCache | None = None,
    deadline: float | None = None,
) -> Prediction:
    """Patch the slide with the packaged settings, embed every patch with the student, run CLAM;
    with `heatmap`, the attention overlay PNG, `heatmap_size` px on its longest side, with a
    colour legend (`efcm.evaluation.heatmap.render`); with `geojson_out`, the attention as
    GeoJSON tiles QuPath opens (`efcm.evaluation.geojson.tiles`); with `gallery_k`, a PNG of the
    k most and least attended patches.

    `uri` is a local path or gs:// (staged into `cache`, held there while it is used and kept to
    its size cap; see `efcm.io.cache.SlideCache.staged`).
    `Prediction.timings` has the seconds of each step: download, patching (mpp, tissue, grid),
    features (reading + student), clam, heatmap, geojson, gallery (those asked for).

    Raises:
        InvalidSlide: no such slide (status `missing`), an I/O error reading it or
            unreadable/corrupt, at open or at any tile read (`unreadable`), no mpp (`no_mpp`),
            no tissue (`no_tissue`), too coarse. A client error: the caller named that slide.
        TooLarge: over `max_slide_bytes` or `max_patches`.
        Deadline: still running at `deadline`.
        InvalidInput: `heatmap_size` out of range (checked before the slide is read).
    """
    check_kind(rt, SLIDE, "a slide")
    try:
        heatmap_size = check_size(heatmap_size, "heatmap_size")
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    uri = str(uri)
    params = PatchParams.model_validate(rt.meta["patch"])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[step] = round(now - t0, 4)
        t0 = now

    try:
        with staged(uri, cache=cache, max_slide_bytes=max_slide_bytes) as local:
            lap("download")
            _check_time(deadline, "download")
            pred = _predict_local(
                rt,
                uri,
                str(local.path),
                params,
                mpp,
                batch_size,
                read_workers,
                _Outputs(heatmap, heatmap_size, geojson_out, gallery_k),
                max_patches,
                deadline,
                lap,
            )
    except TooLarge as err:
        raise TooLarge(f"slide {err}") from None
    except FileNotFoundError as err:
        msg = str(err)
        raise InvalidSlide(msg if uri in msg else f"slide {uri}: {msg}", status="missing") from None
    except OSError as err:  # an I/O error staging or reading the slide: its name, not its bytes
        log.warning("%s: %s: %s", uri, type(err).__name__, err)
        raise InvalidSlide(
            f"slide {uri}: cannot be read ({type(err).__name__})", status="unreadable"
        ) from None
    pred.timings = timings
    pred.downloaded_bytes = local.downloaded_bytes
    return pred


@dataclass(frozen=True)
class _Outputs:
    """The optional outputs a slide prediction was asked for."""

    heatmap: bool
    heatmap_size: int
    geojson: bool
    gallery_k: int


def _predict_local(
    rt: Runtime,
    uri: str,
    path: str,
    params: PatchParams,
    mpp: float | None,
    batch_size: int,
    read_workers: int,
    outputs: _Outputs,
    max_patches: int | None,
    deadline: float | None,
    lap,
) -> Prediction:
    try:
        with open_slide(path) as slide:
            # the runtime is idle until the plan is made: the readers read its thumbnail
            plan = plan_patches(
                slide, params, mpp_override=mpp, name=uri, workers=max(1, read_workers)
            )
    except InvalidSlide as err:
        raise _as_sent(err, path, uri) from None
    except openslide.OpenSlideError as err:  # opened, but a tile cannot be decoded
        raise _corrupt(uri, err) from None
    lap("patching")
    if len(plan.coords) == 0:
        raise InvalidSlide(f"{uri}: no tissue found", status="no_tissue")
    _check_count(len(plan.coords), max_patches, f"slide {uri}")
    g = plan.geometry
    patches = SlidePatches(
        path,
        CoordsFile(plan.coords, g.patch_level, g.read_size, g.patch_size, uri, g.step0, g.size0),
    )
    reader = _read_ahead(patches, batch_size, read_workers, deadline)
    try:
        try:
            feats = rt.embed(reader, total=len(patches), desc="predict")
        finally:
            # A consumer that raised leaves the generator suspended, its pool still reading:
            # close() runs its `finally` (cancel what is queued, wait for what runs) before the
            # slide handle those threads share is closed below.
            reader.close()
        lap("features")
        pred = predict_features(rt, feats)
        lap("clam")
        pred.coords = plan.coords
        if outputs.heatmap:
            # the readers are done: their shared handle reads the heatmap's pyramid level
            pred.heatmap_png = encode_png(
                render(patches.slide, plan.coords, g.size0, pred.attention, outputs.heatmap_size)
            )
            lap("heatmap")
        if outputs.geojson:
            dims = patches.slide.dimensions
            pred.heatmap_geojson = geojson.encode(
                geojson.tiles(plan.coords, g.size0, pred.attention, dims)
            )
            lap("geojson")
        if outputs.gallery_k:
            pred.gallery_png = encode_png(gallery(patches.read, pred.attention, outputs.gallery_k))
            lap("gallery")
    except InvalidSlide as err:  # the handle the readers open lazily
        raise _as_sent(err, path, uri) from None
    except openslide.OpenSlideError as err:  # a reader thread's, re-raised by the generator
        raise _corrupt(uri, err) from None
    finally:
        patches.close()
    return pred


def _as_sent(err: InvalidSlide, path: str, uri: str) -> InvalidSlide:
    # name the slide as the client did (its gs:// URI), not by its local cache path
    return InvalidSlide(str(err).replace(path, uri), status=err.status)


def _corrupt(uri: str, err: Exception) -> InvalidSlide:
    # OpenSlide's own text names the local (cache) file and libjpeg/libtiff internals: logged,
    # not sent to the client
    log.warning("%s: %s: %s", uri, type(err).__name__, err)
    return InvalidSlide(
        f"{uri}: corrupt or unreadable slide ({type(err).__name__}: a tile cannot be read)",
        status="unreadable",
    )
