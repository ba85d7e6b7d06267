"""The image manifest: a CSV with `image_id, case_id, uri, label`, the image-level twin of the slide
manifest (`efcm.io.manifest`, whose row checks and URI rules it shares).

`case_id` groups the images of one patient (both eyes, several views or visits): splits never
separate them. Relative URIs are taken from the manifest's folder; gs:// URIs are staged through
the slide cache by the reader (`efcm.images.reader`).

Labels name classes of the task (`image.classes` in params): one class per image in a
multi-class task; in a multi-label task (`image.multi_label`) any number separated by `|`
(``effusion|nodule``), or the task's `none_label` (``no_finding``) for an image labelled with no
class present. An empty label marks an unlabelled image: distillation uses it, splits, training
and evaluation leave it out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from efcm.io.cache import SlideCache, local_path
from efcm.io.manifest import absolute_uri, read_rows, write_rows

if TYPE_CHECKING:
    from efcm.config import ImageParams

REQUIRED = ("image_id", "case_id", "uri", "label")
SEPARATOR = "|"


@dataclass(frozen=True)
class LabelSpace:
    """The classes of an image task and how a label cell names them.

    Attributes:
        classes: the class names; their order is the class index.
        multi_label: a label may name several classes, separated by `|`.
        none_label: (multi-label only) the label of an image with no class present.
    """

    classes: tuple[str, ...]
    multi_label: bool = False
    none_label: str = "no_finding"

    @classmethod
    def of(cls, image: ImageParams) -> LabelSpace:
        """The label space of the `image` params section."""
        return cls(tuple(image.classes), image.multi_label, image.none_label)

    def indices(self, label: str) -> tuple[int, ...]:
        """The class indices a non-empty label names, sorted (empty for `none_label`).

        Raises:
            ValueError: an unknown class, a class named twice, several classes in a multi-class
                task, or `none_label` with a class; the message says which (not where: the
                caller adds that).
        """
        names = [n.strip() for n in label.split(SEPARATOR)]
        if self.multi_label and names == [self.none_label]:
            return ()
        if len(names) > 1 and not self.multi_label:
            raise ValueError(
                f"label {label!r} names {len(names)} classes, and the task is multi-class "
                "(set image.multi_label for labels like 'a|b')"
            )
        if self.multi_label and self.none_label in names:
            raise ValueError(f"label {label!r}: {self.none_label!r} goes alone, not with classes")
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            hint = f", or {self.none_label!r}" if self.multi_label else ""
            raise ValueError(
                f"label {label!r}: {unknown} not in the classes {list(self.classes)}{hint} "
                "(leave it empty for an unlabelled image)"
            )
        if len(set(names)) != len(names):
            raise ValueError(f"label {label!r} names a class twice")
        return tuple(sorted(self.classes.index(n) for n in names))

    def target(self, indices: tuple[int, ...]) -> int | np.ndarray:
        """A training target: the class index (multi-class), or a float32 multi-hot vector (C,)
        (multi-label)."""
        if not self.multi_label:
            return indices[0]
        y = np.zeros(len(self.classes), np.float32)
        y[list(indices)] = 1.0
        return y


@dataclass(frozen=True)
class ImageEntry:
    image_id: str
    case_id: str
    uri: str
    label: str  # "" = unlabelled; several classes joined by "|" in a multi-label task

    @property
    def labelled(self) -> bool:
        return bool(self.label)


@dataclass(frozen=True)
class ImageManifest:
    path: Path
    images: tuple[ImageEntry, ...]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def unlabelled(self) -> list[str]:
        """The image_ids with an empty label, in manifest order."""
        return [e.image_id for e in self.images if not e.labelled]

    def labels(self, space: LabelSpace) -> dict[str, tuple[int, ...]]:
        """image_id -> the class indices of its label, for the labelled images only.

        Raises:
            ValueError: a label `space` does not allow, naming the image.
        """
        out = {}
        for e in self.images:
            if e.labelled:
                try:
                    out[e.image_id] = space.indices(e.label)
                except ValueError as err:
                    raise ValueError(f"{self.path}: {e.image_id}: {err}") from None
        return out

    def targets(self, space: LabelSpace) -> dict[str, int | np.ndarray]:
        """image_id -> training target (`LabelSpace.target`), for the labelled images only."""
        return {k: space.target(v) for k, v in self.labels(space).items()}


def read_image_manifest(path: str | Path, space: LabelSpace | None = None) -> ImageManifest:
    """Read and check an image manifest (with `space`, its labels too).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an empty, malformed or duplicate image_id, or a label that
            `space` does not allow, each naming the row.
    """
    images = []
    for r in read_rows(path, "image_id", "image"):
        if space is not None and r.label:
            try:
                space.indices(r.label)
            except ValueError as err:
                raise ValueError(f"{r.where}: {r.item_id}: {err}") from None
        images.append(ImageEntry(r.item_id, r.case_id, r.uri, r.label))
    return ImageManifest(Path(path), tuple(images))


def write_image_manifest(dest: str | Path, images: Iterable[ImageEntry]) -> ImageManifest:
    """Write `images` as an image manifest CSV at `dest` (atomically); returns it."""
    images = tuple(images)
    rows = ((e.image_id, e.case_id, e.uri, e.label) for e in images)
    return ImageManifest(write_rows(dest, REQUIRED, rows), images)


def import_image_manifest(
    uri: str | Path,
    dest: str | Path,
    space: LabelSpace | None = None,
    *,
    cache: SlideCache | None = None,
) -> ImageManifest:
    """Copy an image manifest (local path, or gs:// URI staged into `cache`) to `dest`, checked,
    with every image URI absolute (see `efcm.io.manifest.absolute_uri`). The images themselves
    are referenced, never copied.

    Raises:
        FileNotFoundError: no such manifest.
        ValueError: the manifest is invalid (see `read_image_manifest`), or a relative URI climbs
            out of the bucket.
    """
    src = str(uri)
    manifest = read_image_manifest(local_path(src, cache=cache), space)
    images = [
        ImageEntry(e.image_id, e.case_id, absolute_uri(src, e.uri, e.image_id), e.label)
        for e in manifest.images
    ]
    return write_image_manifest(dest, images)
