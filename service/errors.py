"""One mapping of failures to a gRPC status and to each dialect's own error body.

Everything that can go wrong in a request is raised as a `ServiceError`. The servicers turn it into a
`google.rpc.Status` (code, message, typed details) for gRPC callers; for REST dialects whose error shape
is not `google.rpc.Status`, the body that dialect's clients expect is rendered here too and travels as
the `x-error-body` metadata, which Envoy's Lua filter swaps in for the transcoder's body. No dialect
writes its own error JSON, so every route reports the same failure the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from .dialects import Dialect

DOMAIN = "embedding-service"
ERROR_BODY_HEADER = "x-error-body"
# Set on a failure another replica could answer (this one is draining, its model is loading or its batcher
# died): Envoy retries only these (and connection failures), so one request has one retry budget end to end.
RETRY_ELSEWHERE_HEADER = "x-embed-retry-elsewhere"
# The HTTP status a REST caller gets, where the dialect's API uses one the transcoder's table does not give.
HTTP_STATUS_HEADER = "x-embed-http-status"

# The HTTP status Envoy's transcoder (and grpc-gateway) gives each gRPC code; used where a body repeats it.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

MAX_MESSAGE_CHARS = 600


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class ServiceError(Exception):
    """A failure with everything each dialect needs to report it."""

    code: grpc.StatusCode
    message: str
    # Machine-readable cause, e.g. MODEL_NOT_FOUND (google.rpc.ErrorInfo.reason, OpenAI `code`).
    reason: str = ""
    # The request field at fault (google.rpc.BadRequest, OpenAI `param`).
    param: str | None = None
    # Seconds a caller should wait before retrying (RetryInfo, `Retry-After`).
    retry_after: float | None = None
    # HF's `estimated_time` for a model still loading.
    estimated_time: float | None = None
    # For NOT_FOUND: the kind and name of what is missing (google.rpc.ResourceInfo).
    resource: tuple[str, str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Another replica could answer this request (see RETRY_ELSEWHERE_HEADER).
    retry_elsewhere: bool = False
    # The dialect whose shape this error takes, where it is not the route's: a path two APIs share, whose body
    # chose the other one (Ollama's older `/api/embeddings` on AIGNE Hub's path).
    dialect: str | None = None

    def __post_init__(self) -> None:
        # A message may quote what the caller sent (a model name, a prompt name, a key); it travels three times as
        # response metadata (grpc-message, the rich status, the dialect's body), and metadata past Envoy's header limit
        # broke the HTTP/2 connection every caller shares. Quoted parts are cut here, once for every path.
        self.message = _cap(self.message, MAX_MESSAGE_CHARS)
        if self.param is not None:
            self.param = _cap(self.param, 200)
        if self.resource is not None:
            self.resource = (self.resource[0], _cap(self.resource[1], 200))
        super().__init__(self.message)

    def __reduce__(self):  # crosses from the offload workers intact (Exception's default pickles only args)
        return (self.__class__, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def __str__(self) -> str:  # dataclass repr would hide the message in logs
        return f"{self.code.name}: {self.message}"


def invalid_argument(message: str, param: str | None = None, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, param=param)


def model_not_found(name: str, available: list[str]) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"The model `{_cap(name, 120)}` does not exist. Available models: {', '.join(available)}",
        reason="model_not_found",
        param="model",
        resource=("model", name),
    )


def model_loading(name: str, estimated_time: float) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"Model {name} is currently loading",
        reason="MODEL_LOADING",
        retry_after=max(1.0, estimated_time),
        retry_elsewhere=True,
        estimated_time=round(max(0.0, estimated_time), 1),
    )


def overloaded(message: str, retry_after: float) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason="OVERLOADED", retry_after=max(1.0, retry_after))


def internal(message: str = "Unexpected internal server error occurred") -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, message, reason="INTERNAL")


# ---------------------------------------------------------------------------------------------
# gRPC: google.rpc.Status with typed details


def to_rpc_status(err: ServiceError) -> status_pb2.Status:
    details = []
    info = error_details_pb2.ErrorInfo(reason=err.reason or err.code.name, domain=DOMAIN, metadata=err.metadata)
    details.append(info)
    if err.param and err.code == grpc.StatusCode.INVALID_ARGUMENT:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=err.param, description=err.message)]
            )
        )
    if err.resource:
        details.append(
            error_details_pb2.ResourceInfo(resource_type=err.resource[0], resource_name=err.resource[1], description=err.message)
        )
    if err.retry_after is not None:
        secs = math.ceil(err.retry_after)
        details.append(error_details_pb2.RetryInfo(retry_delay={"seconds": secs}))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=err.code.value[0], message=err.message, details=packed)


def trailing_metadata(err: ServiceError, dialect: Dialect | None) -> tuple[tuple[str, str | bytes], ...]:
    """What travels with the status: rich details, Retry-After, and the dialect's own body for Envoy."""
    md: list[tuple[str, str | bytes]] = [("grpc-status-details-bin", to_rpc_status(err).SerializeToString())]
    if err.retry_after is not None:
        md.append(("retry-after", str(math.ceil(err.retry_after))))
    if err.retry_elsewhere:
        md.append((RETRY_ELSEWHERE_HEADER, "1"))
    if err.dialect is not None:
        from .dialects import by_name

        dialect = by_name(err.dialect) or dialect
    if dialect is not None and dialect.http_status is not None:
        status = dialect.http_status(err)
        if status != err.http_status:
            md.append((HTTP_STATUS_HEADER, str(status)))
    body = render_body(err, dialect)
    if body is not None:
        md.append((ERROR_BODY_HEADER, body.decode("ascii")))
    return tuple(md)


# ---------------------------------------------------------------------------------------------
# REST: each dialect's own body (its `Dialect.error_body`). JSON is kept ASCII (escaped) so it can travel
# as gRPC metadata.


def _dumps(obj: object) -> bytes:
    # gRPC metadata must be printable ASCII: the stdlib escapes everything else as \uXXXX (surrogate pairs included).
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def render_body(err: ServiceError, dialect: Dialect | None) -> bytes | None:
    """The error body `dialect`'s clients expect, or None where google.rpc.Status JSON is the shape."""
    if err.dialect is not None:
        from .dialects import by_name

        dialect = by_name(err.dialect) or dialect
    if dialect is None or dialect.error_body is None:
        return None
    return _dumps(dialect.error_body(err))
