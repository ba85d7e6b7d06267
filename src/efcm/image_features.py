"""Image feature extraction: every image of an image manifest -> encoder -> one features h5.

The image-level twin of `efcm.features` (whose pieces it uses: `embed_batches`, `device_of`, the
stored extraction settings and the reuse check). DataLoader workers read and preprocess whole
batches of images (`efcm.images.reader.ImageReader`); an image that fails to read becomes its
status row (`image_loop`, the slides' `SlideLoop` keyed by image_id) and the batch goes on; an
unexpected error on most images fails the run (`BatchFailed`).

Layout: ONE file, `<out>/features.h5`, datasets `features` (N, D) (float32, or float16 with
`extract.float16`), `image_id` (N,) and `uri` (N,) (UTF-8 strings), rows in manifest order of the
images that extracted ok, and the encoder, weights, transform and preprocessing settings as
attributes (JSON in `efcm_extract_settings`, as a slide's features h5). One file rather than one
per image (10^5 small files are slow on every file system and on GCS) or per shard: an image's
feature is one row, 10^5 x 1024 float16 is 200 MB, the rows are written in chunks as they come
(bounded memory) and distillation, training and evaluation read it in one go.

A rerun reuses the rows of images whose `image_id` and `uri` are in the existing file when the
file is complete and was made with the same settings; the other images are extracted (the log
says why), and the file is rewritten atomically with both. A file replaced under the same URI is
not detected (as a slide is not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from efcm.config import ExtractParams, ImageParams
from efcm.errors import InvalidInput
from efcm.features import (
    device_of,
    embed_batches,
    extract_settings,
    read_extract_settings,
    write_attrs,
)
from efcm.images.reader import ImageReader, image_loop
from efcm.io.files import atomic_path, remove_stale_parts
from efcm.io.image_manifest import ImageEntry, ImageManifest
from efcm.io.package import PIXEL_KEYS
from efcm.slides.batch import ALREADY_DONE
from efcm.slides.patching import made_with

log = logging.getLogger(__name__)

FEATURES_FILE = "features.h5"
_FLUSH_ROWS = 1024  # rows buffered before they are appended to the h5


def preprocess_settings(params: ImageParams) -> dict[str, Any]:
    """The preprocessing that makes the pixels an encoder sees (stored with the features)."""
    return params.model_dump(mode="json", include=set(PIXEL_KEYS))


def _portable(err: Exception) -> Exception:
    """`err` as it can cross from a DataLoader worker (pickled), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


class _ImageBatches(Dataset):
    """Item = a list of indices into `entries` -> (uint8 (b, S, S, 3) tensor of the images that
    read, one error or None per index): a bad image is a value, not a dead worker."""

    def __init__(self, entries: list[ImageEntry], reader: ImageReader) -> None:
        self.entries, self.reader = entries, reader

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, list[Exception | None]]:
        size = self.reader.params.size
        pixels, errors = [], []
        for i in indices:
            try:
                pixels.append(self.reader(self.entries[i]))
                errors.append(None)
            except Exception as err:  # the loop classifies it (expected or a bug)
                errors.append(_portable(err))
        stack = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
        return torch.from_numpy(stack), errors


class _Outcomes:
    """(feature (D,), None) or (None, the error) for every entry, in order (`next`); the encoder
    runs on each batch's readable images, and a failed forward is the error of each image of
    its batch. The DataLoader's workers start (fork) when this is made: make it before opening
    any h5 file, so that no worker inherits a file handle (and HDF5's lock on it)."""

    def __init__(
        self,
        model: nn.Module,
        entries: list[ImageEntry],
        reader: ImageReader,
        params: ExtractParams,
    ) -> None:
        loader = DataLoader(
            _ImageBatches(entries, reader),
            sampler=BatchSampler(SequentialSampler(entries), params.batch_size, drop_last=False),
            batch_size=None,
            num_workers=params.num_workers,
            pin_memory=device_of(model).type == "cuda",
        )
        self.model = model
        self.batches: Iterator[Any] | None = iter(loader)
        self.ready: list[tuple[np.ndarray | None, Exception | None]] = []

    def __next__(self) -> tuple[np.ndarray | None, Exception | None]:
        if not self.ready:
            if self.batches is None:
                raise StopIteration
            self.ready = self._embed(*next(self.batches))[::-1]
        return self.ready.pop()

    def _embed(
        self, pixels: torch.Tensor, errors: list[Exception | None]
    ) -> list[tuple[np.ndarray | None, Exception | None]]:
        feats, failed = None, None
        if len(pixels):
            try:
                feats = embed_batches(self.model, [pixels], desc="extract images")
            except Exception as err:  # recorded per image; most images failing fails the run
                failed = err
        out: list[tuple[np.ndarray | None, Exception | None]] = []
        k = 0
        for err in errors:
            if err is not None or failed is not None:
                out.append((None, err or failed))
            else:
                out.append((feats[k], None))
                k += 1
        return out

    def close(self) -> None:
        """Stop the workers (dropping the loader's iterator shuts them down)."""
        self.batches, self.ready = None, []


class _Rows:
    """The new features h5, appended in chunks to a temporary file, renamed by `close`."""

    def __init__(self, path: Path, float16: bool) -> None:
        self.path, self.tmp = path, atomic_path(path)
        self.dtype = np.float16 if float16 else np.float32
        self.f = h5py.File(self.tmp, "w")
        self.buf: list[tuple[str, str, np.ndarray]] = []
        self.n = 0

    def add(self, image_id: str, uri: str, feature: np.ndarray) -> None:
        self.buf.append((image_id, uri, feature))
        if len(self.buf) >= _FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        ids, uris, feats = zip(*self.buf, strict=True)
        x = np.stack(feats).astype(self.dtype)
        if "features" not in self.f:
            text = h5py.string_dtype()
            self.f.create_dataset(
                "features", (0, x.shape[1]), self.dtype, maxshape=(None, x.shape[1]), chunks=True
            )
            self.f.create_dataset("image_id", (0,), text, maxshape=(None,), chunks=True)
            self.f.create_dataset("uri", (0,), text, maxshape=(None,), chunks=True)
        n = self.n + len(x)
        for name, rows in (("features", x), ("image_id", ids), ("uri", uris)):
            self.f[name].resize(n, axis=0)
            self.f[name][self.n : n] = rows
        self.n, self.buf = n, []

    def close(self, attrs: dict[str, Any], settings: dict[str, Any]) -> None:
        self.flush()
        if "features" not in self.f:  # no image extracted: an empty, complete file
            text = h5py.string_dtype()
            self.f.create_dataset("features", (0, 0), self.dtype)
            self.f.create_dataset("image_id", (0,), text)
            self.f.create_dataset("uri", (0,), text)
        write_attrs(self.f, attrs, settings)
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def features_complete(path: Path) -> bool:
    """An image features h5 that opens with equally long `features`, `image_id` and `uri`."""
    try:
        with h5py.File(path, "r") as f:
            return all(k in f for k in ("features", "image_id", "uri")) and (
                len(f["features"]) == len(f["image_id"]) == len(f["uri"])
            )
    except OSError:
        return False


def _reusable(path: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, tuple[str, int]]:
    """image_id -> (uri, row) of the rows an earlier run wrote with the same settings."""
    if overwrite or not path.is_file():
        return {}
    if not features_complete(path) or not made_with(
        "images", path, "extraction", read_extract_settings, settings, "an older efcm"
    ):
        return {}
    with h5py.File(path, "r") as f:
        ids = f["image_id"].asstr()[:]
        uris = f["uri"].asstr()[:]
    return {i: (u, row) for row, (i, u) in enumerate(zip(ids, uris, strict=True))}


def extract_images(
    model: nn.Module,
    manifest: ImageManifest,
    reader: ImageReader,
    out_dir: str | Path,
    params: ExtractParams,
    attrs: dict[str, Any],
    *,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Features of every image of `manifest` into out_dir/features.h5 (see the module
    docstring), and out_dir/status.csv (one row per image: `ok`, or a bad image's status and
    reason; `already done` for a reused row).

    `model` takes uint8 images (see EncoderWithTransform, with the task's `encoder_spec`);
    `reader` reads and preprocesses them; `attrs` (encoder, weights hash, input transform,
    preprocessing) go into the file and, with `float16`, are the settings a rerun compares.

    Raises:
        BatchFailed: an unexpected error hit most images.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out)  # a features.h5 cut off by a kill
    path = out / FEATURES_FILE
    settings = extract_settings(attrs, params)
    reuse = _reusable(path, settings, overwrite)

    def reused(entry: ImageEntry) -> bool:
        return reuse.get(entry.image_id, ("",))[0] == entry.uri

    todo = [e for e in manifest.images if not reused(e)]
    model.eval()
    outcomes = _Outcomes(model, todo, reader, params)  # first: see there
    rows = _Rows(path, params.float16)

    def work(entry: ImageEntry, row: dict[str, Any]) -> None:
        if reused(entry):
            rows.add(entry.image_id, entry.uri, old[reuse[entry.image_id][1]])
            row["reason"] = ALREADY_DONE
            return
        feature, err = next(outcomes)
        if err is not None:
            raise err
        rows.add(entry.image_id, entry.uri, feature)

    try:
        with h5py.File(path, "r") if reuse else contextlib.nullcontext() as f:
            old = f["features"] if f is not None else None
            result = image_loop("extract", work).run(manifest.images, out / "status.csv")
        outcomes.close()
        rows.close({**attrs, "n_images": rows.n + len(rows.buf)}, settings)
    except BaseException:
        outcomes.close()
        rows.abort()
        raise
    return result


@dataclass(frozen=True)
class ImageFeatures:
    """An image features h5 read whole: `features` (N, D) float32, `image_ids` and `uris` (N,),
    the extraction `settings` (None for a file without them), the file's `path`."""

    features: np.ndarray
    image_ids: list[str]
    uris: list[str]
    settings: dict[str, Any] | None
    path: Path

    def rows(self) -> dict[str, int]:
        """image_id -> row."""
        return {i: k for k, i in enumerate(self.image_ids)}


def image_features_path(features_dir: str | Path) -> Path:
    """features.h5 in an image extraction's output folder (or the file itself)."""
    p = Path(features_dir)
    return p / FEATURES_FILE if p.is_dir() else p


def read_image_features(features_dir: str | Path) -> ImageFeatures:
    """The features h5 of an image extraction (its output folder, or the file).

    Raises:
        FileNotFoundError: no such file.
        InvalidInput: not an image features h5 (no `features` / `image_id`, or unequal lengths).
    """
    path = image_features_path(features_dir)
    if not path.is_file():
        raise FileNotFoundError(f"image features not found: {path} (run extract --kind image)")
    with h5py.File(path, "r") as f:
        if not all(k in f for k in ("features", "image_id", "uri")):
            raise InvalidInput(
                f"{path}: not an image features h5 (it needs 'features', 'image_id' and 'uri')"
            )
        feats = np.asarray(f["features"][:], np.float32)
        ids = list(f["image_id"].asstr()[:])
        uris = list(f["uri"].asstr()[:])
    if not len(ids) == len(uris) == len(feats):
        raise InvalidInput(
            f"{path}: {len(feats)} features rows, {len(ids)} image_ids, {len(uris)} uris"
        )
    return ImageFeatures(feats, ids, uris, read_extract_settings(path), path)
