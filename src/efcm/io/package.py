"""The model package format (`efcm.package/2`): its name, its two kinds, and the input geometry
each records. Writing is `efcm.training.export` (slides) and `efcm.training.image_export`
(images); loading as modules is `efcm.models.package`.

A package is of one `kind`: `slide` (a student and CLAM fold models: bags of patches) or `image`
(a student and linear fold heads: one image, `efcm.models.image_head`). A package without `kind`
(written before image packages existed) is a slide package.
"""

from __future__ import annotations

from typing import Any

FORMAT = "efcm.package/2"
SLIDE, IMAGE = "slide", "image"
KINDS = (SLIDE, IMAGE)


# patch keys that are not the package's geometry: how a batch treats failures, and the mpp
# override of one training slide (a served slide gets its own mpp, or --mpp)
NOT_GEOMETRY = ("fail_on", "mpp_override")

#: The `image` params that make an image's pixels (mean / std are the encoder spec's, recorded
#: under the package's `encoder`): what an image package records and checks, and what an image
#: features file stores as its preprocessing.
PIXEL_KEYS = ("size", "resize", "crop", "fov_threshold", "channels")


def geometry(settings: dict[str, Any]) -> dict[str, Any]:
    """The patch settings that make a slide's patches (all but NOT_GEOMETRY)."""
    return {k: v for k, v in settings.items() if k not in NOT_GEOMETRY}


def image_geometry(settings: dict[str, Any]) -> dict[str, Any]:
    """The image settings that make an image's pixels (PIXEL_KEYS)."""
    return {k: settings.get(k) for k in PIXEL_KEYS}


def kind_of(meta: dict[str, Any]) -> str:
    """The package's kind (`slide` for a model.json without one)."""
    return str(meta.get("kind", SLIDE))
