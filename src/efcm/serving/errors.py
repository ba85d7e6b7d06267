"""The one table from the errors of a request to their HTTP and gRPC status: `STATUS`.

| error (`efcm.errors`, unless named)                        | HTTP | gRPC              |
|------------------------------------------------------------|------|-------------------|
| `InvalidInput` (`InvalidTensor`, `InvalidSlide`), kserve's | 400  | INVALID_ARGUMENT  |
| `Forbidden`: a slide URI outside the allowed locations     | 403  | PERMISSION_DENIED |
| `TooLarge`: over a limit (patches, slide bytes, instances) | 413  | RESOURCE_EXHAUSTED|
| `Deadline`: past the request's time budget                 | 504  | DEADLINE_EXCEEDED |
| `Busy`: every model worker at work                         | 503  | UNAVAILABLE       |
| anything else: `PackageError`, a bug, a torch error        | 500  | INTERNAL          |

A client error is answered with its message (it names the input and what is wrong). Anything
else is the server's fault: it is logged with its traceback and a request id, and the answer
says only "internal error (request id ...)", never the exception's text (paths, internals).

How the table reaches both protocols: kserve 0.21 has error classes for 400, 404, 500 and 503
only, and its gRPC interceptor (`kserve.protocol.grpc.interceptors.ExceptionToStatusInterceptor`)
passes a `grpc_interceptor` `GrpcException` through with that exception's own status code (every
other unknown exception is INTERNAL). So `refusal` turns any exception into a `Refused`, a
`GrpcException` that also carries its HTTP status: the model raises only those
(`EFCMModel.__call__`), and `efcm.serving.server` answers them over REST with one FastAPI handler
(and answers any other exception that reaches it, from kserve's own code, with `refusal` too).
"""

from __future__ import annotations

from efcm.serving import _kserve  # noqa: F401  (first: hides sys.argv from kserve)

# isort: split
import logging
import uuid

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput as KServeInvalidInput

from efcm.errors import Busy, Deadline, Forbidden, InvalidInput, TooLarge

log = logging.getLogger(__name__)

STATUS: dict[type[Exception], tuple[int, StatusCode]] = {
    InvalidInput: (400, StatusCode.INVALID_ARGUMENT),
    KServeInvalidInput: (400, StatusCode.INVALID_ARGUMENT),
    Forbidden: (403, StatusCode.PERMISSION_DENIED),
    TooLarge: (413, StatusCode.RESOURCE_EXHAUSTED),
    Deadline: (504, StatusCode.DEADLINE_EXCEEDED),
    Busy: (503, StatusCode.UNAVAILABLE),
}
INTERNAL = (500, StatusCode.INTERNAL)


class Refused(GrpcException):
    """A request answered with `http_status` (REST) and `status_code` (gRPC); `details` is the
    message sent to the client."""

    def __init__(self, details: str, http_status: int, status_code: StatusCode) -> None:
        super().__init__(details, status_code)
        self.http_status = http_status

    def __str__(self) -> str:
        return self.details


def status_of(err: BaseException) -> tuple[int, StatusCode]:
    """(HTTP status, gRPC code) of `err` by `STATUS`; INTERNAL for everything it does not list."""
    for kind, status in STATUS.items():
        if isinstance(err, kind):
            return status
    return INTERNAL


def refusal(err: Exception) -> Refused:
    """The answer to `err`: its own message and status for a client error; for a server fault a
    500 naming only a request id, under which `err` and its traceback are logged."""
    if isinstance(err, Refused):
        return err
    status = status_of(err)
    if status is not INTERNAL:
        return Refused(str(err), *status)
    request_id = uuid.uuid4().hex[:16]
    log.error("internal error (request id %s)", request_id, exc_info=err)
    return Refused(f"internal error (request id {request_id})", *INTERNAL)
