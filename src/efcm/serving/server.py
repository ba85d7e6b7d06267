"""`efcm serve`: load the package, then run kserve's ModelServer (v1 + v2 REST on `http_port`,
gRPC on `grpc_port`; the REST server binds 0.0.0.0).

The package is loaded before the server starts: a missing or corrupt package ends `efcm serve` with
one line on stderr and exit status 1, and the pod never turns ready. Slide-URI input is allowed only
under the locations in `EFCM_SLIDE_URI_PREFIXES` (see `efcm.serving.policy`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import kserve
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from efcm.serving.model import EFCMModel
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)


def build_model(
    package: str | Path,
    *,
    model_name: str = "efcm",
    slide_access: SlideAccessPolicy | None = None,
) -> EFCMModel:
    """The loaded model; raises PackageError when the package cannot be loaded."""
    model = EFCMModel(model_name, package, slide_access=slide_access)
    model.load()
    return model


async def _request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # A v2 body that is not an inference request at all (no "inputs", an input without "shape", ...)
    # is a bad request like any other: 400 with the reason, as for InvalidInput, not FastAPI's 422.
    errors = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return JSONResponse(status_code=400, content={"error": f"invalid request body: {errors}"})


async def _value_error(_: Request, exc: ValueError) -> JSONResponse:
    # kserve decodes a v2 body before the model sees it, and lets numpy's ValueError out when the
    # binary data does not fill the declared shape: a client error, not a 500. The model turns its
    # own ValueErrors into InvalidInput (which keeps kserve's handler: it is more specific).
    log.warning("bad request: %s", exc)
    return JSONResponse(status_code=400, content={"error": f"invalid request: {exc}"})


def serve(
    package: str | Path,
    *,
    model_name: str = "efcm",
    http_port: int = 8080,
    grpc_port: int = 8081,
) -> None:
    """Serve `package` until SIGTERM/SIGINT; raises PackageError, before serving, if it cannot
    be loaded."""
    model = build_model(package, model_name=model_name, slide_access=SlideAccessPolicy.from_env())
    from kserve.model_server import app

    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ValueError, _value_error)
    log.info("serving %s as %r: http %d, grpc %d", package, model_name, http_port, grpc_port)
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port).start([model])
