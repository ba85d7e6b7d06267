"""Request bodies -> bags, for both protocols. Pure functions: no kserve import.

v2 (Open Inference Protocol), one bag per request, exactly one of
  input `features`: FP32 (or FP16, binary data only) of shape [N, D], N >= 1 patch features,
  input `patches`: UINT8 [N, S, S, 3], patch pixels (S = the packaged patch size) the student
  embeds, or
  input `slide_uri`: BYTES [1], a slide the server patches and embeds itself (the request
  parameter `mpp` overrides the slide's mpp, `heatmap: true` adds the heatmap PNG, `heatmap_size`
  its longest side in px (64 .. 8192, default 1024), `geojson: true` the attention as GeoJSON
  tiles QuPath opens); only where the access policy allows it.
or, for an image package (`kind: image`),
  input `image`: BYTES [1], one encoded image file (PNG, JPEG, TIFF or DICOM): the raw bytes over
  gRPC or with REST's binary-data extension, base64 text in a REST JSON body; or UINT8 [H, W, 3]
  RGB (or [H, W] grey) pixels. The package's own preprocessing (fundus crop, resize, channels)
  runs on the server.
v1, one bag per instance, at most `MAX_V1_INSTANCES` (16) instances (the model answers 413 past
it), all under one time budget:
  {"instances": [{"features": [[...], ...]}, {"slide_uri": "gs://...", "mpp": 0.5, "heatmap": true,
   "heatmap_size": 2048, "geojson": true}, [[...], ...]]}
  or for an image package {"instances": [{"image": {"b64": "<base64 file>"}}, {"image": [[...]]}]}
  (TF Serving's {"b64": ...} convention for binary values; a nested list is uint8 pixels).

Everything malformed is a client error (HTTP 400, `efcm.serving.errors.STATUS`) with a message
naming the expected input: `InvalidTensor` for a tensor that cannot be one (wrong datatype, ragged,
data that do not fill the declared shape), `InvalidInput` for the rest of the request. The value
checks of the tensors themselves (shape, empty bag, NaN) are `efcm.inference.check_features` and
`check_patches`, called by the predict functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from efcm.errors import InvalidInput, InvalidTensor
from efcm.evaluation.heatmap import DEFAULT_SIZE, check_size

FEATURES = "features"
SLIDE_URI = "slide_uri"
PROBABILITIES = "probabilities"
ATTENTION = "attention"
COORDS = "coords"
LABEL = "label"
HEATMAP_PNG = "heatmap_png"
HEATMAP_GEOJSON = "heatmap_geojson"
HEATMAP_SIZE = "heatmap_size"
GEOJSON = "geojson"
PATCHES = "patches"
IMAGE = "image"
FEATURE_DATATYPES = ("FP32", "FP16")
MAX_V1_INSTANCES = 16  # bags in one v1 request; each is also under EFCM_MAX_PATCHES
INPUTS = (FEATURES, PATCHES, SLIDE_URI, IMAGE)
IMAGE_WANT = (
    f"input '{IMAGE}': BYTES [1] (an encoded PNG, JPEG, TIFF or DICOM file; base64 text in a "
    "REST JSON body) or UINT8 [H, W, 3] / [H, W] pixels"
)


@dataclass(frozen=True)
class FeaturesBag:
    features: np.ndarray  # as sent; checked by efcm.inference.check_features


@dataclass(frozen=True)
class PatchesBag:
    patches: np.ndarray  # as sent; checked by efcm.inference.check_patches


@dataclass(frozen=True)
class SlideBag:
    uri: str
    mpp: float | None = None
    heatmap: bool = False
    heatmap_size: int = DEFAULT_SIZE
    geojson: bool = False


@dataclass(frozen=True)
class ImageBag:
    image: bytes | np.ndarray  # an encoded file, or pixels as sent (checked by predict_image)


Bag = FeaturesBag | PatchesBag | SlideBag | ImageBag


class V2Input(Protocol):
    """The part of kserve's InferInput used here."""

    name: str
    datatype: str
    shape: list[int]

    def as_numpy(self) -> np.ndarray: ...


def expected(dim: int) -> str:
    return f"expected input '{FEATURES}' of shape [N, {dim}] (N >= 1 patches, FP32 or FP16, finite)"


def _mpp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInput(f"mpp must be a positive number, got {value!r}")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidInput(f"parameter '{name}' must be true or false, got {value!r}")


def _size(value: Any) -> int:
    if value is None:
        return DEFAULT_SIZE
    # JSON has one number type: 1024.0 is 1024 px; REST parameters may also arrive as text
    whole_float = isinstance(value, float) and value.is_integer()
    if whole_float or (isinstance(value, str) and value.strip().isdigit()):
        value = int(value)
    try:
        return check_size(value, f"parameter '{HEATMAP_SIZE}'")
    except ValueError as err:
        raise InvalidInput(str(err)) from None


def _slide_bag(uri: str, params: dict[str, Any]) -> SlideBag:
    return SlideBag(
        uri,
        _mpp(params.get("mpp")),
        _flag(params.get("heatmap"), "heatmap"),
        _size(params.get(HEATMAP_SIZE)),
        _flag(params.get(GEOJSON), GEOJSON),
    )


def _uri(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{SLIDE_URI}' is not UTF-8 text") from None
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"input '{SLIDE_URI}' must be a non-empty string, got {value!r}")
    return value


def _image_text(value: str) -> bytes:
    """An image file sent as base64 text (a REST JSON body cannot carry raw bytes)."""
    import base64
    import binascii

    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            f"input '{IMAGE}' is text but not base64: a REST JSON body carries the image file "
            f"base64-encoded; {IMAGE_WANT}"
        ) from None


def _image_file(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str):
        data = _image_text(value)
    else:
        raise InvalidInput(f"input '{IMAGE}' holds {type(value).__name__}; {IMAGE_WANT}")
    if not data:
        raise InvalidInput(f"input '{IMAGE}' is empty (0 bytes); {IMAGE_WANT}")
    return data


def _image_pixels(data: Any) -> np.ndarray:
    """v1 pixels: a nested list of integers 0..255 -> uint8."""
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidTensor(f"image pixels are not a rectangular array; {IMAGE_WANT}") from None
    if arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
        raise InvalidTensor(f"image pixels must be integers 0..255; {IMAGE_WANT}")
    return arr.astype(np.uint8)


def _v1_image(value: Any) -> ImageBag:
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        return ImageBag(_image_file(value["b64"]))
    if isinstance(value, list):
        return ImageBag(_image_pixels(value))
    raise InvalidInput(
        f'"{IMAGE}" must be {{"b64": "<base64 file>"}} or a nested list of uint8 pixels'
    )


def _v2_image(inp: V2Input) -> ImageBag:
    if inp.datatype == "UINT8":
        try:
            return ImageBag(inp.as_numpy())
        except (ValueError, TypeError) as err:  # kserve's as_numpy: numpy's reshape
            raise InvalidTensor(
                f"input '{IMAGE}' data does not match its shape {list(inp.shape)} ({err})"
            ) from None
    if inp.datatype != "BYTES":
        raise InvalidTensor(
            f"input '{IMAGE}' has datatype {inp.datatype}, shape {list(inp.shape)}; {IMAGE_WANT}"
        )
    try:
        values = inp.as_numpy().reshape(-1)
    except (ValueError, TypeError):  # kserve's as_numpy: numpy's reshape
        values = ()
    if len(values) != 1:
        raise InvalidInput(f"input '{IMAGE}' must be BYTES of shape [1] (one file); {IMAGE_WANT}")
    return ImageBag(_image_file(values[0]))


def _v1_features(data: Any, dim: int) -> np.ndarray:
    # JSON has no dtype: integral numbers are features too; strings, booleans, objects are not.
    try:
        arr = np.asarray(data)
    except ValueError:
        raise InvalidTensor(f"features are not a rectangular array; {expected(dim)}") from None
    if arr.dtype.kind in "iu":
        return arr.astype(np.float32)
    if arr.dtype.kind != "f":
        raise InvalidTensor(f"features must be numbers, got {arr.dtype}; {expected(dim)}")
    return arr


def v1_bags(body: Any, dim: int) -> list[Bag]:
    """`{"instances": [...]}` -> one bag per instance. `body` may still be bytes: kserve leaves the
    body undecoded when the client sent a non-JSON content type (curl -d, form posts)."""
    if isinstance(body, bytes | str):
        try:
            body = json.loads(body)
        except ValueError:
            raise InvalidInput("the request body is not JSON; " + expected(dim)) from None
    if not isinstance(body, dict) or "instances" not in body:
        raise InvalidInput(
            'a v1 request is {"instances": [{"features": [[...], ...]}]}; ' + expected(dim)
        )
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(f'"instances" must be a non-empty list; {expected(dim)}')
    bags: list[Bag] = []
    for inst in instances:
        if isinstance(inst, dict) and FEATURES in inst:
            bags.append(FeaturesBag(_v1_features(inst[FEATURES], dim)))
        elif isinstance(inst, dict) and IMAGE in inst:
            bags.append(_v1_image(inst[IMAGE]))
        elif isinstance(inst, dict) and SLIDE_URI in inst:
            uri = inst[SLIDE_URI]
            if not isinstance(uri, str) or not uri:
                raise InvalidInput(f"{SLIDE_URI} must be a non-empty string, got {uri!r}")
            bags.append(_slide_bag(uri, inst))
        elif isinstance(inst, list):
            bags.append(FeaturesBag(_v1_features(inst, dim)))
        else:
            keys = sorted(inst) if isinstance(inst, dict) else type(inst).__name__
            raise InvalidInput(
                f"an instance needs '{FEATURES}', '{SLIDE_URI}' or '{IMAGE}', got {keys}; "
                + expected(dim)
            )
    return bags


def v2_bag(inputs: list[V2Input], parameters: dict[str, Any] | None, dim: int) -> Bag:
    """The inputs of one v2 request -> its bag."""
    by_name = {i.name: i for i in inputs}
    given = [n for n in INPUTS if n in by_name]
    if len(given) > 1:
        raise InvalidInput(f"send exactly one of the inputs {list(INPUTS)}, got {given}")
    if IMAGE in by_name:
        return _v2_image(by_name[IMAGE])
    if PATCHES in by_name:
        inp = by_name[PATCHES]
        if inp.datatype != "UINT8":
            raise InvalidTensor(
                f"input '{PATCHES}' has datatype {inp.datatype}, shape {list(inp.shape)}; "
                "expected UINT8 [N, S, S, 3] patch pixels"
            )
        try:
            arr = inp.as_numpy()
        except (ValueError, TypeError) as err:  # kserve's as_numpy: numpy's reshape
            raise InvalidTensor(
                f"input '{PATCHES}' data does not match its shape {list(inp.shape)} ({err})"
            ) from None
        return PatchesBag(arr)
    if FEATURES in by_name:
        inp = by_name[FEATURES]
        if inp.datatype not in FEATURE_DATATYPES:
            raise InvalidTensor(
                f"input '{FEATURES}' has datatype {inp.datatype}, shape {list(inp.shape)}; "
                + expected(dim)
            )
        try:
            arr = inp.as_numpy()  # the declared shape; raises if the data does not fill it
        except (ValueError, TypeError) as err:  # kserve's as_numpy: numpy's reshape
            raise InvalidTensor(
                f"input '{FEATURES}' data does not match its shape {list(inp.shape)} ({err}); "
                + expected(dim)
            ) from None
        return FeaturesBag(arr)
    if SLIDE_URI in by_name:
        inp = by_name[SLIDE_URI]
        try:
            values = inp.as_numpy().reshape(-1) if inp.datatype == "BYTES" else ()
        except (ValueError, TypeError):  # kserve's as_numpy: numpy's reshape
            values = ()
        if len(values) != 1:
            raise InvalidInput(f"input '{SLIDE_URI}' must be BYTES of shape [1]")
        return _slide_bag(_uri(values[0]), parameters or {})
    raise InvalidInput(
        f"no input '{FEATURES}', '{PATCHES}', '{SLIDE_URI}' or '{IMAGE}' (got {sorted(by_name)}); "
        + expected(dim)
    )
