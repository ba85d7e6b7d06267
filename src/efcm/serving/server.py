"""`efcm serve`: load the package, then run kserve's ModelServer (v1 + v2 REST on `http_port`,
gRPC on `grpc_port`; the REST server binds 0.0.0.0).

The package is loaded before the server starts: a missing or corrupt package ends `efcm serve` with
one line on stderr and exit status 1, and the pod never turns ready. Slide-URI input is allowed only
under the locations in `EFCM_SLIDE_URI_PREFIXES` and `--allow-slides` (see `efcm.serving.policy`).

Request size: a REST body over `EFCM_MAX_REQUEST_BYTES` is refused with 413 before it is read
(by its Content-Length, or while it streams in); gRPC's receive limit is the same number (gRPC
answers RESOURCE_EXHAUSTED past it), and its send limit is at least 64 MiB.
"""

from __future__ import annotations

from efcm.serving import _kserve  # noqa: F401  (first: hides sys.argv from kserve)

# isort: split
import logging
from pathlib import Path

import kserve
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from efcm.limits import ServingLimits
from efcm.serving.errors import Refused, too_large
from efcm.serving.model import EFCMModel
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)


def build_model(
    package: str | Path,
    *,
    model_name: str = "efcm",
    slide_access: SlideAccessPolicy | None = None,
    limits: ServingLimits | None = None,
) -> EFCMModel:
    """The loaded model; raises PackageError when the package cannot be loaded."""
    model = EFCMModel(model_name, package, slide_access=slide_access, limits=limits)
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


async def _refused(_: Request, exc: Refused) -> JSONResponse:
    log.warning("refused (%d): %s", exc.http_status, exc.details)
    return JSONResponse(status_code=exc.http_status, content={"error": exc.details})


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (Content-Length, or counted)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"request body over the limit of {self.max_bytes} bytes (EFCM_MAX_REQUEST_BYTES); "
            "send large bags over gRPC within the limit, or send a slide_uri"
        )
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            log.warning("refused (413): %s bytes", length.decode())
            await JSONResponse(status_code=413, content={"error": message})(scope, receive, send)
            return
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large(message)  # answered by the Refused handler
            return msg

        await self.app(scope, counted, send)


def configure_app(app, limits: ServingLimits) -> None:
    """Exception handlers and the body-size limit on kserve's FastAPI app."""
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(Refused, _refused)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)


def serve(
    package: str | Path,
    *,
    model_name: str = "efcm",
    http_port: int = 8080,
    grpc_port: int = 8081,
    allow_slides: tuple[str, ...] | list[str] = (),
) -> None:
    """Serve `package` until SIGTERM/SIGINT; raises PackageError, before serving, if it cannot
    be loaded. `allow_slides` adds slide locations to `EFCM_SLIDE_URI_PREFIXES`; the limits come
    from the environment (`ServingLimits.from_env`)."""
    limits = ServingLimits.from_env()
    access = SlideAccessPolicy.from_env(extra=allow_slides)
    model = build_model(package, model_name=model_name, slide_access=access, limits=limits)
    from kserve import model_server

    configure_app(model_server.app, limits)
    # kserve hands its module-level argument namespace to the gRPC server as its options
    model_server.args.grpc_max_receive_message_length = limits.max_request_bytes
    model_server.args.grpc_max_send_message_length = max(limits.max_request_bytes, 64 << 20)
    log.info(
        "serving %s as %r: http %d, grpc %d; slides from %s; limits %s",
        package,
        model_name,
        http_port,
        grpc_port,
        list(access.prefixes) or "nowhere",
        limits,
    )
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port).start([model])
