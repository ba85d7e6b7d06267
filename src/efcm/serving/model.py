"""`EFCMModel`: the `kserve.Model` that serves one exported package.

The package is loaded once, in `load()`, by `efcm.training.export.load_package` (sha256-verified); a
package that cannot be loaded raises `PackageError` there, so `efcm serve` stops at startup with one
line instead of serving 500s. Prediction is `efcm.inference.predict_features` (features in),
`predict_patches` (patch pixels in) or `predict_slide` (slide URI in, where
`policy.SlideAccessPolicy` allows it), run in a worker thread so health checks stay answered during
a long slide, under the `efcm.limits.ServingLimits` of the server.

Slide requests run on their own pool of EFCM_MAX_CONCURRENT_SLIDES threads;
features and patches requests run on asyncio's default executor, so slides never hold them up. A
slide request that finds every slide worker busy is answered 503 (gRPC UNAVAILABLE) at once, not
queued. A worker stays busy until its slide really stops: a request answered 504 leaves its thread
running to its next deadline check, and that thread keeps its slot until then, so abandoned work is
bounded by the pool. A v1 request has one time budget for all its instances (at most
`request.MAX_V1_INSTANCES`, 413 past it). CLAM runs on the CPU (it is small and
`predict_features` feeds it CPU tensors); the student moves to the GPU when there is one.

Errors (see `efcm.serving.errors` for the gRPC codes): a malformed request, a bad tensor (wrong
dtype, rank, width, NaN, empty bag) or a bad slide (missing, empty, corrupt, no mpp, no tissue) is
`kserve.errors.InvalidInput` (HTTP 400, gRPC INVALID_ARGUMENT) with a message naming the input and
what is wrong; a slide URI outside the allowed locations is 403; a bag or slide over a limit is 413;
a request past its time budget is 504; a slide request while every slide worker is busy is 503; a
request before the model is ready is kserve's `ModelNotReady` (HTTP 503).
"""

from __future__ import annotations

from efcm.serving import _kserve  # noqa: F401  (first: hides sys.argv from kserve)

# isort: split
import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kserve
import numpy as np
import torch
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import to_http_parameters

from efcm.errors import Deadline, Forbidden, PackageError, TooLarge
from efcm.inference import Prediction, patch_size, predict_features, predict_patches, predict_slide
from efcm.io.cache import SlideCache
from efcm.limits import ServingLimits, cache_dir
from efcm.models.package import Package, load_package
from efcm.serving import errors
from efcm.serving import request as rq
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)


class EFCMModel(kserve.Model):
    def __init__(
        self,
        name: str,
        package_dir: str | Path,
        *,
        slide_access: SlideAccessPolicy | None = None,
        limits: ServingLimits | None = None,
        read_workers: int = 2,
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
        self.read_workers = read_workers
        self.package: Package | None = None
        self._slide_pool: ThreadPoolExecutor | None = None
        self._slide_lock = threading.Lock()
        self._slides_busy = 0

    @property
    def slides_busy(self) -> int:
        """Slide workers at work now (including ones whose request was already answered 504)."""
        return self._slides_busy

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Load the package; raises PackageError (one line, no traceback needed) if it cannot."""
        try:
            pkg = load_package(self.package_dir)
        except PackageError:
            self.ready = False
            raise
        except Exception as err:  # torch / json / pydantic errors all mean the same: unusable
            self.ready = False
            raise PackageError(
                f"{self.package_dir}: cannot load the model package ({type(err).__name__}: {err})"
            ) from err
        if torch.cuda.is_available():
            pkg.encoder.to("cuda")
        self.package = pkg
        self.ready = True
        log.info(
            "model %s: package %s, %d-d features, classes %s, slide input %s",
            self.name,
            self.package_dir,
            pkg.feature_dim,
            pkg.classes,
            "on" if self.slide_access.enabled else "off",
        )
        return True

    def start(self) -> None:
        # kserve's default marks every registered model ready, loaded or not.
        self.ready = self.package is not None

    def _pkg(self) -> Package:
        if self.package is None or not self.ready:
            raise ModelNotReady(self.name, "The model package is not loaded.")
        return self.package

    # -- metadata (GET /v2/models/<name>) --------------------------------------------------------

    def get_input_types(self) -> list[dict[str, Any]]:
        pkg = self._pkg()
        size = patch_size(pkg)
        return [
            {"name": rq.FEATURES, "datatype": "FP32", "shape": [-1, pkg.feature_dim]},
            {"name": rq.PATCHES, "datatype": "UINT8", "shape": [-1, size, size, 3]},
            {"name": rq.SLIDE_URI, "datatype": "BYTES", "shape": [1]},
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        n_classes = len(self._pkg().classes)
        return [
            {"name": rq.PROBABILITIES, "datatype": "FP32", "shape": [1, n_classes]},
            {"name": rq.LABEL, "datatype": "BYTES", "shape": [1]},
            {"name": rq.ATTENTION, "datatype": "FP32", "shape": [-1]},
            {"name": rq.COORDS, "datatype": "INT64", "shape": [-1, 2]},
            {"name": rq.HEATMAP_PNG, "datatype": "BYTES", "shape": [1]},
        ]

    # -- inference -------------------------------------------------------------------------------

    def _run(self, pkg: Package, bag: rq.Bag, deadline: float) -> Prediction:
        lim = self.limits
        try:
            if isinstance(bag, rq.FeaturesBag):
                return predict_features(pkg, bag.features, max_patches=lim.max_patches)
            if isinstance(bag, rq.PatchesBag):
                return predict_patches(
                    pkg, bag.patches, max_patches=lim.max_patches, deadline=deadline
                )
            uri = self.slide_access.check(bag.uri)
            return predict_slide(
                pkg,
                uri,
                mpp=bag.mpp,
                heatmap=bag.heatmap,
                read_workers=self.read_workers,
                max_patches=lim.max_patches,
                max_slide_bytes=lim.max_slide_bytes,
                cache=self.cache,
                deadline=deadline,
            )
        except Forbidden as err:
            raise errors.forbidden(str(err)) from None
        except TooLarge as err:
            raise errors.too_large(str(err)) from None
        except Deadline as err:
            raise errors.timed_out(f"{err} of {lim.request_timeout_s:g} s") from None
        except (ValueError, FileNotFoundError) as err:
            if isinstance(bag, rq.FeaturesBag):
                raise InvalidInput(f"{err}; {rq.expected(pkg.feature_dim)}") from None
            if isinstance(bag, rq.PatchesBag):
                raise InvalidInput(str(err)) from None
            msg = str(err)
            raise InvalidInput(msg if bag.uri in msg else f"slide {bag.uri}: {msg}") from None
        except OSError as err:  # an I/O error reading an allowed slide: its name, not its bytes
            raise InvalidInput(
                f"slide {getattr(bag, 'uri', '')}: cannot be read ({type(err).__name__})"
            ) from None

    def _start_slide(self, pkg: Package, bag: rq.Bag, deadline: float) -> asyncio.Future:
        """`_run` on a free slide worker; 503 at once when there is none."""
        size = self.limits.max_concurrent_slides
        with self._slide_lock:
            if self._slides_busy >= size:
                raise errors.busy(
                    f"all {size} slide workers are busy (EFCM_MAX_CONCURRENT_SLIDES); retry later"
                )
            if self._slide_pool is None:
                self._slide_pool = ThreadPoolExecutor(size, thread_name_prefix="efcm-slide")
            self._slides_busy += 1
        try:
            fut = self._slide_pool.submit(self._run, pkg, bag, deadline)
        except BaseException:
            self._slide_done(None)
            raise
        # released when the work really ends (or is cancelled before it starts), not when the
        # client is answered: a 504'd slide keeps its slot until its thread stops
        fut.add_done_callback(self._slide_done)
        return asyncio.wrap_future(fut)

    def _slide_done(self, _) -> None:
        with self._slide_lock:
            self._slides_busy -= 1

    async def _run_within_budget(self, pkg: Package, bag: rq.Bag, deadline: float) -> Prediction:
        budget = self.limits.request_timeout_s
        timed_out = errors.timed_out(f"the request ran past its time budget of {budget:g} s")
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out
        if isinstance(bag, rq.SlideBag):
            work = self._start_slide(pkg, bag, deadline)
        else:  # the default executor: never behind slides
            work = asyncio.to_thread(self._run, pkg, bag, deadline)
        try:
            # the worker stops by itself at its next batch past `deadline`; wait_for answers on
            # time even when it is inside one long step (a download, a thumbnail)
            return await asyncio.wait_for(work, left)
        except TimeoutError:
            raise timed_out from None

    async def predict(
        self,
        payload: dict[str, Any] | kserve.InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | kserve.InferResponse:
        pkg = self._pkg()
        deadline = time.monotonic() + self.limits.request_timeout_s  # one budget per request
        if isinstance(payload, kserve.InferRequest):
            try:
                params = to_http_parameters(payload.parameters) if payload.parameters else None
                bag = rq.v2_bag(payload.inputs, params, pkg.feature_dim)
            except ValueError as err:
                raise InvalidInput(str(err)) from None
            pred = await self._run_within_budget(pkg, bag, deadline)
            return self._v2_response(payload, pred)
        try:
            bags = rq.v1_bags(payload, pkg.feature_dim)
        except ValueError as err:
            raise InvalidInput(str(err)) from None
        if len(bags) > rq.MAX_V1_INSTANCES:
            raise errors.too_large(
                f"{len(bags)} instances in one request, over the limit of "
                f"{rq.MAX_V1_INSTANCES} instances; send several requests"
            )
        preds = [await self._run_within_budget(pkg, bag, deadline) for bag in bags]
        return {"predictions": [self._v1_prediction(pkg, p) for p in preds]}

    @staticmethod
    def _v1_prediction(pkg: Package, pred: Prediction) -> dict[str, Any]:
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
        if pred.timings:
            out["timings"] = pred.timings
            out["downloaded_bytes"] = pred.downloaded_bytes
        return out

    def _v2_response(self, req: kserve.InferRequest, pred: Prediction) -> kserve.InferResponse:
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
