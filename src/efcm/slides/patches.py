"""Reading patch pixels for a coords file, one slide handle per process.

Used by the extraction engine, distillation and serving alike. The handle is opened lazily in the
process that reads (a DataLoader worker opens its own), never pickled across processes. Within a
process, threads share it (one OpenSlide handle is safe to read from several threads): the first
read opens it under a lock, so threads that start reading together open one handle, not one each
(leaking the others).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cv2
import numpy as np
import openslide

from efcm.io.cache import SlideCache
from efcm.slides.patching import CoordsFile
from efcm.slides.reader import open_slide, read_rgb


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
        rs, ps = self.coords.read_size, self.coords.patch_size
        img = read_rgb(self.slide, (int(x), int(y)), self.coords.patch_level, (rs, rs))
        if rs != ps:
            interp = cv2.INTER_AREA if rs > ps else cv2.INTER_LINEAR
            img = cv2.resize(img, (ps, ps), interpolation=interp)
        return img

    def read_batch(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """uint8 (B, patch_size, patch_size, 3)."""
        return np.stack([self.read(int(i)) for i in indices])

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None
