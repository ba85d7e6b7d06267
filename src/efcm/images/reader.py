"""A manifest's images read and preprocessed, and the per-image batch loop.

`ImageReader(params, base_dir, cache)` is what an image stage holds: called with an
`ImageEntry` (or a URI) it returns the preprocessed uint8 (size, size, 3) array; it is a small
picklable object, so DataLoader workers and process pools can take it. A gs:// image is staged
through the slide cache (`efcm.io.cache`), as slides are; a relative path is taken from the
manifest's folder.

`image_loop` is the slides' `SlideLoop` keyed by `image_id`: every image gets a status row,
and a bad image (an `InvalidImage`, a missing file) is a row with its status and reason, never a
stopped batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efcm.config import ImageParams
from efcm.errors import InvalidImage
from efcm.images.decode import decode_image
from efcm.images.preprocess import preprocess
from efcm.io.cache import SlideCache, local_path
from efcm.io.image_manifest import ImageEntry
from efcm.slides.batch import SlideLoop, check_batch

ID_COLUMN = "image_id"


def max_file_bytes(params: ImageParams) -> int:
    """The largest image file worth reading: `max_pixels` of uncompressed 16-bit RGB, plus 1 MiB
    of header (a bigger file is no image of an allowed size, and is not read into memory)."""
    return 6 * params.max_pixels + (1 << 20)


def read_file(
    uri: str,
    *,
    base_dir: str | Path | None = None,
    cache: SlideCache | None = None,
    max_bytes: int | None = None,
) -> bytes:
    """The bytes of an image file (a gs:// one staged into `cache`).

    Raises:
        FileNotFoundError: no such file.
        InvalidImage: a folder, an empty file, or one over `max_bytes` (`too_large`).
        ValueError: a gs:// URI with no `cache`, an unsupported scheme.
    """
    path = local_path(uri, cache=cache, base_dir=base_dir)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {uri}")
    if path.is_dir():
        raise InvalidImage(f"{uri}: is a directory, not an image file")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise InvalidImage(
            f"{uri}: {size} bytes, more than an image of image.max_pixels can take "
            f"({max_bytes} bytes)",
            status="too_large",
        )
    data = path.read_bytes()
    if not data:
        raise InvalidImage(f"{uri}: empty file (0 bytes)")
    return data


def load_image(data: bytes, name: str, params: ImageParams) -> np.ndarray:
    """An image file's bytes -> the preprocessed uint8 (size, size, 3) array. The one path from
    bytes to pixels: the batch stages and (later) the server use it alike.

    Raises:
        InvalidImage: see `decode_image` and `preprocess`.
    """
    img = decode_image(data, name, max_pixels=params.max_pixels, min_side=params.min_side)
    return preprocess(img, params, name)


@dataclass(frozen=True)
class ImageReader:
    """Reads and preprocesses the images of a manifest (see the module docstring)."""

    params: ImageParams
    base_dir: Path | None = None
    cache: SlideCache | None = None

    def __call__(self, image: ImageEntry | str) -> np.ndarray:
        """uint8 (size, size, 3) RGB of an entry or a URI.

        Raises:
            FileNotFoundError, InvalidImage, ValueError: see `read_file` and `load_image`.
        """
        uri = image.uri if isinstance(image, ImageEntry) else image
        data = read_file(
            uri, base_dir=self.base_dir, cache=self.cache, max_bytes=max_file_bytes(self.params)
        )
        return load_image(data, uri, self.params)


ImageWork = Callable[[ImageEntry, dict[str, Any]], None]
"""A stage's work on one image: fills its status row and raises when the image fails."""


def image_loop(
    what: str,
    work: ImageWork,
    columns: Mapping[str, Any] | None = None,
    on_failure: Callable[[ImageEntry], None] | None = None,
) -> SlideLoop:
    """The per-image loop of an image stage: `SlideLoop` with `image_id` rows (see there)."""
    return SlideLoop(what, work, dict(columns or {}), on_failure, id_column=ID_COLUMN)


def check_images(rows: list[dict[str, Any]], what: str, fail_on: str) -> list[dict[str, Any]]:
    """`check_batch` for image rows: raise BatchFailed when `fail_on` (image.fail_on) says so."""
    return check_batch(rows, what, fail_on, ID_COLUMN)
