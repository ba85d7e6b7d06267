"""`EFCMModel`: the `kserve.Model` that serves one exported package, built as kserve's own model
servers are: `load()` once, then per request `preprocess` -> `predict` -> `postprocess`.

- `load()`: the package, served by the runtime of `EFCM_RUNTIME` (`efcm.runtimes.load_runtime`:
  torch, or ONNX Runtime FP32 / INT8 without torch; sha256-verified); a package that cannot be
  loaded raises `PackageError` there, so `efcm serve` stops at startup with one line instead of
  serving 500s.
- `preprocess()`: the v1 or v2 body -> its bags (`efcm.serving.request`) and the request's time
  budget (`EFCM_REQUEST_TIMEOUT_S`, one for all the instances of a v1 request; at most
  `request.MAX_V1_INSTANCES` of them, 413 past it).
- `predict()`: the bags through `efcm.inference` (`predict_features`, `predict_patches`, or
  `predict_slide` where `policy.SlideAccessPolicy` allows the URI), as ONE job on the server's
  bounded `executor.ModelExecutor`, whatever the input kind: at most `EFCM_MAX_CONCURRENT_SLIDES`
  requests at model work at once, 503 at once when all are, 504 past the budget.
- `postprocess()`: the predictions -> the v1 or v2 response.

Errors: `__call__` is the one boundary. Every exception of a request leaves it as an
`efcm.serving.errors.Refused`, with the status of `errors.STATUS` (the same over REST and gRPC): a
client error (400 bad tensor or slide, 403, 413, 504, 503) with its message; anything else a
logged 500 that names only a request id. A request before the model is ready is kserve's
`ModelNotReady` (503), answered by kserve.

With the torch runtime, CLAM runs on the CPU (it is small) and the student on the GPU when there
is one. One runtime serves every worker thread at once: its modules and ONNX Runtime sessions keep
no per-call state (`efcm.models.transscan.SelectiveKernel`). This module imports no torch.
"""

from __future__ import annotations

from efcm.serving import _kserve  # noqa: F401  (first: hides sys.argv from kserve)

# isort: split
import base64
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kserve
import numpy as np
from kserve.errors import ModelNotReady
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import to_http_parameters

from efcm.errors import InvalidSlide, InvalidTensor, PackageError, TooLarge
from efcm.inference import (
    Prediction,
    check_kind,
    predict_features,
    predict_image,
    predict_patches,
    predict_slide,
)
from efcm.io.cache import SlideCache
from efcm.io.package import IMAGE, SLIDE
from efcm.limits import RuntimeSettings, ServingLimits, cache_dir
from efcm.runtimes import Runtime, load_runtime
from efcm.serving import errors
from efcm.serving import request as rq
from efcm.serving.executor import Budget, ModelExecutor
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parsed:
    """What `preprocess` hands `predict`: the bags, their budget, and the v2 request they came
    from (None for v1), which the response answers."""

    bags: tuple[rq.Bag, ...]
    budget: Budget
    v2: kserve.InferRequest | None = None


@dataclass(frozen=True)
class Answered:
    """What `predict` hands `postprocess`: one prediction per bag."""

    parsed: Parsed
    predictions: list[Prediction]


class EFCMModel(kserve.Model):
    def __init__(
        self,
        name: str,
        package_dir: str | Path,
        *,
        slide_access: SlideAccessPolicy | None = None,
        limits: ServingLimits | None = None,
        runtime: RuntimeSettings | None = None,
        cache: SlideCache | None = None,
    ) -> None:
        super().__init__(name)
        self.package_dir = Path(package_dir)
        self.slide_access = slide_access if slide_access is not None else SlideAccessPolicy()
        self.limits = limits if limits is not None else ServingLimits()
        # gs:// slides: EFCM_CACHE_DIR, capped at the limits' EFCM_CACHE_MAX_BYTES
        self.cache = (
            cache if cache is not None else SlideCache(cache_dir(), self.limits.cache_max_bytes)
        )
        self.settings = runtime if runtime is not None else RuntimeSettings()
        self.package: Runtime | None = None
        # sized once: the workers and the queue are read here, the other limits per request
        self.executor = ModelExecutor(
            self.limits.max_concurrent_slides, self.limits.max_queued_requests
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the package; raises PackageError (one line, no traceback needed) if it cannot."""
        try:
            pkg = load_runtime(
                self.package_dir, self.settings.runtime, threads=self.settings.threads
            )
        except PackageError:
            self.ready = False
            raise
        except Exception as err:  # torch / json / pydantic errors all mean the same: unusable
            self.ready = False
            raise PackageError(
                f"{self.package_dir}: cannot load the model package ({type(err).__name__}: {err})"
            ) from err
        self.package = pkg
        self.ready = True
        log.info(
            "model %s: package %s, %d-d features, classes %s, slide input %s, %s, %d read workers",
            self.name,
            self.package_dir,
            pkg.feature_dim,
            pkg.classes,
            "on" if self.slide_access.enabled else "off",
            pkg.describe(),
            self.settings.read_workers,
        )
        return True

    def start(self) -> None:
        # kserve's default marks every registered model ready, loaded or not.
        self.ready = self.package is not None

    def _pkg(self) -> Runtime:
        if self.package is None or not self.ready:
            raise ModelNotReady(self.name, "The model package is not loaded.")
        return self.package

    # -- metadata (GET /v2/models/<name>) --------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        pkg = self._pkg()
        if pkg.kind == IMAGE:
            return [
                {"name": rq.IMAGE, "datatype": "BYTES", "shape": [1]},
                {"name": rq.IMAGE, "datatype": "UINT8", "shape": [-1, -1, 3]},
            ]
        size = pkg.patch_size
        return [
            {"name": rq.FEATURES, "datatype": "FP32", "shape": [-1, pkg.feature_dim]},
            {"name": rq.PATCHES, "datatype": "UINT8", "shape": [-1, size, size, 3]},
            {"name": rq.SLIDE_URI, "datatype": "BYTES", "shape": [1]},
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        pkg = self._pkg()
        n_classes = len(pkg.classes)
        if pkg.kind == IMAGE:  # a multi-label call is a list of classes, maybe empty
            label = [-1] if pkg.multi_label else [1]
            return [
                {"name": rq.PROBABILITIES, "datatype": "FP32", "shape": [1, n_classes]},
                {"name": rq.LABEL, "datatype": "BYTES", "shape": label},
            ]
        return [
            {"name": rq.PROBABILITIES, "datatype": "FP32", "shape": [1, n_classes]},
            {"name": rq.LABEL, "datatype": "BYTES", "shape": [1]},
            {"name": rq.ATTENTION, "datatype": "FP32", "shape": [-1]},
            {"name": rq.COORDS, "datatype": "INT64", "shape": [-1, 2]},
            {"name": rq.HEATMAP_PNG, "datatype": "BYTES", "shape": [1]},
            {"name": rq.HEATMAP_GEOJSON, "datatype": "BYTES", "shape": [1]},
        ]

    # -- a request -------------------------------------------------------------------------------

    async def __call__(
        self,
        body: dict[str, Any] | kserve.InferRequest,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> tuple[Any, dict[str, str]]:
        """kserve's preprocess -> predict -> postprocess; the one place where an exception
        becomes its answer (`errors.refusal`), so REST and gRPC give the same status."""
        if verb is not InferenceVerb.PREDICT:  # explain: not served, kserve answers 501 itself
            return await super().__call__(body, headers, verb)
        try:
            return await super().__call__(body, headers, verb)
        except ModelNotReady:
            raise  # kserve's own, answered 503 / UNAVAILABLE by kserve
        except Exception as err:
            raise errors.refusal(err) from None

    def validate(self, payload: Any) -> Any:
        # `preprocess` has parsed and checked the request; kserve's checks are for raw bodies
        return payload

    def preprocess(
        self, payload: dict[str, Any] | kserve.InferRequest, headers: dict[str, str] | None = None
    ) -> Parsed:
        """The body -> its bags; the request's time budget starts here."""
        dim = self._pkg().feature_dim
        budget = Budget.start(self.limits.request_timeout_s)
        if isinstance(payload, kserve.InferRequest):
            params = to_http_parameters(payload.parameters) if payload.parameters else None
            return Parsed((rq.v2_bag(payload.inputs, params, dim),), budget, payload)
        bags = rq.v1_bags(payload, dim)
        if len(bags) > rq.MAX_V1_INSTANCES:
            raise TooLarge(
                f"{len(bags)} instances in one request, over the limit of "
                f"{rq.MAX_V1_INSTANCES} instances; send several requests"
            )
        return Parsed(tuple(bags), budget)

    async def predict(
        self,
        payload: Parsed,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Answered:
        """Every bag of the request, in turn, as one job on the bounded executor."""
        pkg = self._pkg()
        preds = await self.executor.run(
            self._predict_bags, pkg, payload.bags, payload.budget, budget=payload.budget
        )
        return Answered(payload, preds)

    def postprocess(
        self,
        result: Answered,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | kserve.InferResponse:
        pkg = self._pkg()
        if result.parsed.v2 is not None:
            return self._v2_response(result.parsed.v2, result.predictions[0])
        return {"predictions": [_v1_prediction(pkg, p) for p in result.predictions]}

    # -- model work (on an executor thread) ------------------------------------------------------

    def _predict_bags(
        self, pkg: Runtime, bags: tuple[rq.Bag, ...], budget: Budget
    ) -> list[Prediction]:
        preds = []
        for i, bag in enumerate(bags):
            if i:  # the worker of a request answered 504 stops here, at the latest
                budget.check(f"instance {i + 1} of {len(bags)}")
            preds.append(self._predict_bag(pkg, bag, budget.deadline))
        return preds

    def _predict_bag(self, pkg: Runtime, bag: rq.Bag, deadline: float) -> Prediction:
        lim = self.limits
        if isinstance(bag, rq.ImageBag):
            return predict_image(pkg, bag.image, name=f"input '{rq.IMAGE}'", deadline=deadline)
        if isinstance(bag, rq.FeaturesBag):
            check_kind(pkg, SLIDE, f"input '{rq.FEATURES}'")
            try:
                return predict_features(pkg, bag.features, max_patches=lim.max_patches)
            except InvalidTensor as err:  # say what the input should have been
                raise InvalidTensor(f"{err}; {rq.expected(pkg.feature_dim)}") from None
        if isinstance(bag, rq.PatchesBag):
            return predict_patches(pkg, bag.patches, max_patches=lim.max_patches, deadline=deadline)
        try:
            return predict_slide(
                pkg,
                self.slide_access.check(bag.uri),
                mpp=bag.mpp,
                heatmap=bag.heatmap,
                heatmap_size=bag.heatmap_size,
                geojson_out=bag.geojson,
                read_workers=self.settings.read_workers,
                max_patches=lim.max_patches,
                max_slide_bytes=lim.max_slide_bytes,
                cache=self.cache,
                deadline=deadline,
            )
        except InvalidSlide as err:  # named as the client sent it, not as resolved
            msg = str(err)
            if bag.uri in msg:
                raise
            raise InvalidSlide(f"slide {bag.uri}: {msg}", status=err.status) from None

    # -- responses -------------------------------------------------------------------------------

    def _v2_response(self, req: kserve.InferRequest, pred: Prediction) -> kserve.InferResponse:
        if self._pkg().kind == IMAGE:
            return self._v2_image_response(req, pred)
        tensors = [
            (rq.PROBABILITIES, "FP32", pred.probabilities.reshape(1, -1).astype(np.float32)),
            (rq.ATTENTION, "FP32", pred.attention.astype(np.float32)),
        ]
        if pred.coords is not None:
            tensors.append((rq.COORDS, "INT64", pred.coords.astype(np.int64)))
        outputs = []
        for name, datatype, arr in tensors:
            out = kserve.InferOutput(name, list(arr.shape), datatype)
            # As a list: kserve 0.21's InferResponse.to_grpc cannot take ndarray data when it
            # answers in raw bytes (it tests the array's truth value); to_rest / to_grpc re-encode.
            out.set_data_from_numpy(arr, binary_data=False)
            outputs.append(out)
        outputs.insert(1, kserve.InferOutput(rq.LABEL, [1], "BYTES", data=[pred.label]))
        if pred.heatmap_png is not None:
            # gRPC carries bytes; JSON cannot, so REST answers the PNG base64-encoded
            png = (
                pred.heatmap_png
                if req.from_grpc
                else base64.b64encode(pred.heatmap_png).decode("ascii")
            )
            outputs.append(kserve.InferOutput(rq.HEATMAP_PNG, [1], "BYTES", data=[png]))
        if pred.heatmap_geojson is not None:
            # JSON text: UTF-8 bytes over gRPC, a string over REST
            text = pred.heatmap_geojson if req.from_grpc else pred.heatmap_geojson.decode("utf-8")
            outputs.append(kserve.InferOutput(rq.HEATMAP_GEOJSON, [1], "BYTES", data=[text]))
        parameters: dict[str, Any] = {"label": pred.label, "n_patches": len(pred.attention)}
        if pred.timings:
            parameters["timings"] = json.dumps(pred.timings)
            parameters["downloaded_bytes"] = int(pred.downloaded_bytes)
        return kserve.InferResponse(
            response_id=req.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=outputs,
            parameters=parameters,
            use_binary_outputs=req.use_binary_outputs,
            requested_outputs=req.request_outputs,
        )

    def _v2_image_response(
        self, req: kserve.InferRequest, pred: Prediction
    ) -> kserve.InferResponse:
        """An image's answer: `probabilities` FP32 [1, C] and `label` BYTES: [1] the class, or
        for a multi-label package [n] the n called classes (n may be 0)."""
        probs = kserve.InferOutput(rq.PROBABILITIES, [1, len(pred.probabilities)], "FP32")
        probs.set_data_from_numpy(  # as a list: see `_v2_response`
            pred.probabilities.reshape(1, -1).astype(np.float32), binary_data=False
        )
        labels = pred.label if isinstance(pred.label, list) else [pred.label]
        label = kserve.InferOutput(rq.LABEL, [len(labels)], "BYTES", data=list(labels))
        return kserve.InferResponse(
            response_id=req.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[probs, label],
            # a parameter is a scalar: the class, or the called classes as JSON text
            parameters={
                "label": pred.label if isinstance(pred.label, str) else json.dumps(pred.label)
            },
            use_binary_outputs=req.use_binary_outputs,
            requested_outputs=req.request_outputs,
        )


def _v1_prediction(pkg: Runtime, pred: Prediction) -> dict[str, Any]:
    if pkg.kind == IMAGE:
        return {
            "label": pred.label,
            "classes": pkg.classes,
            "probabilities": pred.probabilities.tolist(),
        }
    out: dict[str, Any] = {
        "label": pred.label,
        "classes": pkg.classes,
        "probabilities": pred.probabilities.tolist(),
        "attention": pred.attention.tolist(),
    }
    if pred.coords is not None:
        out["coords"] = pred.coords.tolist()
    if pred.heatmap_png is not None:
        out["heatmap_png"] = base64.b64encode(pred.heatmap_png).decode("ascii")
    if pred.heatmap_geojson is not None:  # the GeoJSON object itself: v1 answers JSON
        out["heatmap_geojson"] = json.loads(pred.heatmap_geojson)
    if pred.timings:
        out["timings"] = pred.timings
        out["downloaded_bytes"] = pred.downloaded_bytes
    return out
