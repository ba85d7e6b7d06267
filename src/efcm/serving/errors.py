"""Refusals with their own status: 403 (access), 413 (limits), 504 (time budget), 503 (busy).

kserve 0.21 has error classes for 400 (`InvalidInput`), 404, 503 and 500 only. Its gRPC
interceptor (`kserve.protocol.grpc.interceptors.ExceptionToStatusInterceptor`) passes a
`grpc_interceptor` `GrpcException` through with that exception's own status code, and maps every
other unknown exception to INTERNAL; so a refusal here is a `GrpcException` that also carries its
HTTP status, and `efcm.serving.server` registers one FastAPI handler for it.

| refusal                                   | HTTP | gRPC                 |
|-------------------------------------------|------|----------------------|
| slide URI not allowed (`Forbidden`)    | 403  | PERMISSION_DENIED    |
| over a limit (`TooLarge`), body size | 413  | RESOURCE_EXHAUSTED   |
| time budget (`Deadline`)          | 504  | DEADLINE_EXCEEDED    |
| every slide worker busy                   | 503  | UNAVAILABLE          |
| bad tensor / bad slide (`InvalidInput`)   | 400  | INVALID_ARGUMENT     |
"""

from __future__ import annotations

from grpc import StatusCode
from grpc_interceptor.exceptions import GrpcException


class Refused(GrpcException):
    """A request refused with `http_status` (REST) and `status_code` (gRPC); `details` is the
    message sent to the client."""

    def __init__(self, details: str, http_status: int, status_code: StatusCode) -> None:
        super().__init__(details, status_code)
        self.http_status = http_status

    def __str__(self) -> str:
        return self.details


def forbidden(message: str) -> Refused:
    return Refused(message, 403, StatusCode.PERMISSION_DENIED)


def too_large(message: str) -> Refused:
    return Refused(message, 413, StatusCode.RESOURCE_EXHAUSTED)


def timed_out(message: str) -> Refused:
    return Refused(message, 504, StatusCode.DEADLINE_EXCEEDED)


def busy(message: str) -> Refused:
    return Refused(message, 503, StatusCode.UNAVAILABLE)
