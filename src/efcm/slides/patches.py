"""Reading patch pixels for a coords file: from the slide (one handle per process), or from the
slide's shard in the patch-shard store (`StorePatches`, no slide opened).

Used by the extraction engine, distillation and serving alike. The handle is opened lazily in the
process that reads (a DataLoader worker opens its own), never pickled across processes. Within a
process, threads share it (one OpenSlide handle is safe to read from several threads): the first
read opens it under a lock, so threads that start reading together open one handle, not one each
(leaking the others).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openslide

from efcm.io.cache import SlideCache
from efcm.io.store import Codec, StoreError, read_index, read_rows
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide, read_rgb

MAX_RUN_PX = 4096  # the widest strip one read_region of a row run covers (px at the read level)


def row_runs(
    xy: np.ndarray, downsample: float, read_size: int, max_px: int = MAX_RUN_PX
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split patches (level-0 top-left corners `xy`, in order) into runs that one read_region
    of the read level (whose `downsample` it is) can serve: (lo, hi, offsets), patches lo..hi-1
    of one row, each patch's x offset in px of that level from the run's first.

    A run's patches overlap or touch their neighbour (no gap read for nothing), span at most
    `max_px`, and sit on whole pixels of the read level: OpenSlide reads a region at
    x / downsample, and a fractional position is resampled, so a patch is merged only where its
    own read would start on a whole pixel too, and the strip's pixels are then exactly its own.
    """
    n = len(xy)
    lx, ly = xy[:, 0] / downsample, xy[:, 1] / downsample
    whole = (lx == np.round(lx)) & (ly == np.round(ly))
    lo = 0
    while lo < n:
        hi = lo + 1
        if whole[lo]:
            while hi < n and whole[hi] and xy[hi, 1] == xy[lo, 1]:
                step = lx[hi] - lx[hi - 1]
                if not 0 < step <= read_size or lx[hi] - lx[lo] + read_size > max_px:
                    break
                hi += 1
        yield lo, hi, (lx[lo:hi] - lx[lo]).round().astype(np.int64)
        lo = hi


class SlidePatches:
    """Patch pixels of one slide: `read(i)` -> uint8 (patch_size, patch_size, 3)."""

    def __init__(
        self,
        uri: str,
        coords: CoordsFile,
        base_dir: str | Path | None = None,
        cache: SlideCache | None = None,
    ) -> None:
        self.uri = uri
        self.coords = coords
        self.base_dir = base_dir
        self.cache = cache  # stages a gs:// slide (see `open_slide`)
        self._slide: openslide.OpenSlide | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.coords.coords)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"] = None  # each process opens its own handle
        del state["_lock"]  # a lock cannot be pickled; each process makes its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def slide(self) -> openslide.OpenSlide:
        slide = self._slide  # double-checked: no lock once this process has its handle
        if slide is not None and self._pid == os.getpid():
            return slide
        with self._lock:
            if self._slide is None or self._pid != os.getpid():
                self._slide = open_slide(self.uri, base_dir=self.base_dir, cache=self.cache)
                self._pid = os.getpid()
            return self._slide

    def read(self, i: int) -> np.ndarray:
        x, y = self.coords.coords[i]
        rs = self.coords.read_size
        return self._resize(
            read_rgb(self.slide, (int(x), int(y)), self.coords.patch_level, (rs, rs))
        )

    def _resize(self, img: np.ndarray) -> np.ndarray:
        rs, ps = self.coords.read_size, self.coords.patch_size
        if rs == ps:
            return img
        interp = cv2.INTER_AREA if rs > ps else cv2.INTER_LINEAR
        return cv2.resize(img, (ps, ps), interpolation=interp)

    def read_batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """uint8 (B, patch_size, patch_size, 3), the same pixels as `read` of each index.

        Adjacent patches of one grid row (as the planner lists them) are read with one
        read_region and cut apart (see `row_runs`): the fixed costs of a read (OpenSlide's call,
        the buffer, the colour conversion) are paid once per run instead of once per patch.
        OpenSlide's cost per pixel painted, the bulk of a read, stays."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        ps, rs = self.coords.patch_size, self.coords.read_size
        out = np.empty((len(idx), ps, ps, 3), np.uint8)
        if len(idx) == 0:
            return out
        level = self.coords.patch_level
        xy = self.coords.coords[idx]
        for lo, hi, offsets in row_runs(xy, self.slide.level_downsamples[level], rs):
            x, y = (int(v) for v in xy[lo])
            if hi - lo == 1:
                out[lo] = self._resize(read_rgb(self.slide, (x, y), level, (rs, rs)))
                continue
            strip = read_rgb(self.slide, (x, y), level, (int(offsets[-1]) + rs, rs))
            for k, off in enumerate(offsets):
                out[lo + k] = self._resize(strip[:, off : off + rs])
        return out

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None


class StorePatches:
    """Patch pixels of one slide from its shard in the patch-shard store (`efcm.io.store`), with
    the interface of `SlidePatches`: no slide is opened. The pixels are the slide's, as teacher
    extraction read them, after the store's codec (lossless with `store.format: png`)."""

    def __init__(self, store_dir: str | Path, slide_id: str, coords: CoordsFile) -> None:
        self.index = read_index(store_dir, slide_id)
        self.coords = coords
        self.uri = str(self.index.shard)
        if self.index.patch_size != coords.patch_size or not np.array_equal(
            self.index.coords, coords.coords
        ):
            raise StoreError(
                f"{self.index.shard}: the shard of slide {slide_id} was written from other "
                f"patches ({len(self.index)} of {self.index.patch_size} px) than its coords file "
                f"has now ({len(coords.coords)} of {coords.patch_size} px): rerun teacher "
                "extraction"
            )

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int) -> np.ndarray:
        return self.read_batch([i])[0]

    def read_batch(self, indices: list[int] | np.ndarray | range) -> np.ndarray:
        """uint8 (B, patch_size, patch_size, 3): samples near each other in the shard are read
        together (see `efcm.io.store.read_rows`)."""
        idx = np.asarray(list(indices) if isinstance(indices, range) else indices, np.int64)
        ps = self.index.patch_size
        out = np.empty((len(idx), ps, ps, 3), np.uint8)
        for k, data in enumerate(read_rows(self.index, idx)):
            out[k] = Codec.decode(data, f"{self.index.shard} sample {int(idx[k])}")
        return out

    def close(self) -> None:
        """Nothing to close: every read opens the shard for itself."""


def open_patches(
    slide_id: str,
    uri: str,
    coords: CoordsFile,
    base_dir: str | Path | None = None,
    cache: SlideCache | None = None,
    store_dir: str | Path | None = None,
) -> SlidePatches | StorePatches:
    """A slide's patch pixels: from the patch-shard store when `store_dir` is given (the slide is
    never opened), else from the slide (`uri`, staged into `cache` when gs://)."""
    if store_dir is not None:
        return StorePatches(store_dir, slide_id, coords)
    return SlidePatches(uri, coords, base_dir, cache)
