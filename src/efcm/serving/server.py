"""`efcm serve`: load the package, then run kserve's ModelServer (v1 + v2 REST on `http_port`,
gRPC on `grpc_port`; the REST server binds 0.0.0.0).

The package is loaded before the server starts: a missing or corrupt package ends `efcm serve` with
one line on stderr and exit status 1, and the pod never turns ready. Slide-URI input is allowed only
under the locations in `EFCM_SLIDE_URI_PREFIXES` and `--allow-slides` (see `efcm.serving.policy`).

Options: `efcm serve`'s parser is a child of kserve's own (`kserve.model_server.parser`, as
kserve's model servers build theirs), so kserve's options work as in any KServe model server
(`--max_threads`, `--enable_latency_logging`, `--log_config_file`, ...); efcm adds the package,
`--allow-slides` and the spellings `--http-port`, `--grpc-port`, `--model-name` of its command line
(kserve's `--http_port` ... work too). Two are efcm's: `--workers` must stay 1 (kserve's
multi-process REST server re-imports its app in each process, without this model or its limits),
and the gRPC message limits are `EFCM_MAX_REQUEST_BYTES` (receive) and at least 64 MiB (send).

Request size: a REST body over `EFCM_MAX_REQUEST_BYTES` is refused with 413 before it is read
(by its Content-Length, or while it streams in); gRPC answers RESOURCE_EXHAUSTED past it.
Errors: see `efcm.serving.errors` (one table for REST and gRPC).
"""

from __future__ import annotations

from efcm.serving import _kserve  # first: hides sys.argv from kserve

# isort: split
import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from efcm.errors import TooLarge
from efcm.limits import MAX_REQUEST_BYTES_ENV, RUNTIME_CHOICES, RuntimeSettings, ServingLimits
from efcm.serving.errors import Refused, refusal
from efcm.serving.model import EFCMModel
from efcm.serving.policy import SlideAccessPolicy

log = logging.getLogger(__name__)

MIN_GRPC_SEND_BYTES = 64 << 20  # responses (attention, coords, a heatmap) may outgrow requests


def build_model(
    package: str | Path,
    *,
    model_name: str = "efcm",
    slide_access: SlideAccessPolicy | None = None,
    limits: ServingLimits | None = None,
    runtime: RuntimeSettings | None = None,
) -> EFCMModel:
    """The loaded model; raises PackageError when the package cannot be loaded."""
    model = EFCMModel(
        model_name, package, slide_access=slide_access, limits=limits, runtime=runtime
    )
    model.load()
    return model


# -- REST: exception handlers and middleware on kserve's app --------------------------------------


async def _request_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # A v2 body that is not an inference request at all (no "inputs", an input without "shape", ...)
    # is a bad request like any other: 400 with the reason, as for InvalidInput, not FastAPI's 422.
    errors = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return JSONResponse(status_code=400, content={"error": f"invalid request body: {errors}"})


def _answer(refused: Refused) -> JSONResponse:
    if refused.http_status < 500:
        log.warning("refused (%d): %s", refused.http_status, refused.details)
    return JSONResponse(status_code=refused.http_status, content={"error": refused.details})


async def _refused(_: Request, exc: Refused) -> JSONResponse:
    return _answer(exc)


class ServerFaults:
    """ASGI middleware: an exception that no handler answered (one from kserve's own code: the
    model raises only `Refused`) is answered by `errors.refusal` too, so a server fault is a
    logged 500 naming a request id; kserve's own catch-all would send the exception's type and
    text."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            if started:  # too late for another answer
                raise
            await _answer(refusal(err))(scope, receive, send)


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
            f"request body over the limit of {self.max_bytes} bytes ({MAX_REQUEST_BYTES_ENV}); "
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
                    raise refusal(TooLarge(message))  # answered by the Refused handler
            return msg

        await self.app(scope, counted, send)


def configure_app(app, limits: ServingLimits) -> None:
    """efcm's exception handlers and middleware on kserve's FastAPI app."""
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(Refused, _refused)
    app.add_middleware(ServerFaults)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)


# -- efcm serve -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """`efcm serve`'s options: kserve's own (a copy of its parser) plus efcm's."""
    ap = argparse.ArgumentParser(
        prog="efcm serve",
        description="serve a package with KServe (v1 + v2 REST, gRPC)",
        parents=[_kserve.parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("package", help="the exported package directory")
    # the command line's spellings, onto kserve's own options (whose defaults they keep)
    for flag, dest, kind in (
        ("--http-port", "http_port", int),
        ("--grpc-port", "grpc_port", int),
        ("--model-name", "model_name", str),
    ):
        ap.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"= --{dest}")
    ap.add_argument(
        "--allow-slides",
        action="append",
        default=[],
        metavar="DIR_OR_GS_PREFIX",
        help="a local directory or gs://bucket/prefix/ the slide_uri input may read (repeatable; "
        "adds to EFCM_SLIDE_URI_PREFIXES; none: slide input is refused)",
    )
    ap.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        help="what serves the package (default: EFCM_RUNTIME, else auto: torch where it is "
        "installed, else the package's int8, else onnx)",
    )
    ap.set_defaults(model_name="efcm")  # on the copy: kserve's parser keeps its own
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(list(argv))
    if args.workers != 1:
        ap.error(
            "--workers must be 1: kserve's multi-process REST server re-imports its app in each "
            "process, without this model, its limits or its error handling"
        )
    return args


def main(argv: Sequence[str]) -> None:
    """`efcm serve ARGS...` (the CLI hands its arguments here)."""
    args = parse_args(argv)
    serve(args.package, args)


def serve(package: str | Path, options: argparse.Namespace | None = None) -> None:
    """Serve `package` until SIGTERM/SIGINT with the kserve and efcm `options` of `parse_args`
    (default: all defaults); raises PackageError, before serving, if it cannot be loaded. The
    limits come from the environment (`ServingLimits.from_env`), the slide locations from
    `EFCM_SLIDE_URI_PREFIXES` plus `options.allow_slides`."""
    opts = options if options is not None else parse_args([str(package)])
    limits = ServingLimits.from_env()
    runtime = RuntimeSettings.from_env(runtime=opts.runtime)
    access = SlideAccessPolicy.from_env(extra=opts.allow_slides)
    model = build_model(
        package, model_name=opts.model_name, slide_access=access, limits=limits, runtime=runtime
    )
    configure_app(_kserve.app(), limits)
    opts.grpc_max_receive_message_length = limits.max_request_bytes
    opts.grpc_max_send_message_length = max(limits.max_request_bytes, MIN_GRPC_SEND_BYTES)
    log.info(
        "serving %s as %r: http %d, grpc %d; slides from %s; limits %s",
        package,
        opts.model_name,
        opts.http_port,
        opts.grpc_port,
        list(access.prefixes) or "nowhere",
        limits,
    )
    _kserve.model_server(opts).start([model])
