"""Dialects: thin adapters between one API's wire format and the core `EmbedRequest`/`EmbedResult`.

A dialect never touches a runtime, a batcher or a cache: it maps fields, calls `Embedder.embed`, and
maps the result back. Errors are raised as `ServiceError`s and mapped by `service.errors`.

Adding a dialect is one proto, one module here and its registration: the module defines `DIALECT`, a
`Dialect` that says everything the rest of the service needs to know about it (its gRPC services and how
to add them to the server, its auth schemes, its error body, its REST paths for Envoy's own error
replies). The server, the auth interceptor, the error mapping and Envoy's configuration all read it from
`all_dialects()`; none of them names a dialect.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import grpc

    from ..auth import Scheme
    from ..config import Config
    from ..engine.pipeline import Embedder
    from ..errors import ServiceError


@dataclass(frozen=True)
class Dialect:
    """What the rest of the service knows about one API."""

    # Short name: metric labels, logs, `dialects.disabled`.
    name: str
    # Full gRPC service names (the transcoder exposes them; auth and errors find the dialect by them).
    services: tuple[str, ...]
    # Adds the dialect's servicers to a server: (server, embedder, config).
    add_to_server: Callable[[grpc.aio.Server, Embedder, Config], None]
    # The auth schemes its callers use, tried in order (native gRPC callers and REST alike).
    auth: tuple[Scheme, ...]
    # Schemes for REST callers when they differ from native gRPC callers' (Inworld's REST takes Basic only).
    rest_auth: tuple[Scheme, ...] | None = None
    # The dialect's own error body (JSON-ready), or None where google.rpc.Status JSON is the shape.
    error_body: Callable[[ServiceError], dict[str, Any] | list[Any]] | None = None
    # The HTTP status of a failure where the API's differs from the transcoder's gRPC→HTTP table (TEI's 413/422/424);
    # the server sends it and Envoy applies it. None: the table's.
    http_status: Callable[[ServiceError], int] | None = None
    # REST path prefixes of its routes, for shaping Envoy's own replies (malformed JSON, 413) there; an entry that
    # starts with `^` is a regular expression the whole path must match (a route that is a prefix of another API's).
    rest_prefixes: tuple[str, ...] = ()
    # The body of Envoy's own replies on those routes (Envoy's `json_format`: %LOCAL_REPLY_BODY% is the message).
    envoy_error_body: dict[str, Any] | None = None
    # Path prefixes the API's unknown paths share (`/v2/` is Cohere's): Envoy's 404 there is in its body too. A longer
    # prefix wins over a shorter one of another API (`/api/v1/` over `/api/`).
    fallback_prefixes: tuple[str, ...] = ()
    # Where that body names the status (Google's `"status": "NOT_FOUND"`): the name for each HTTP status, put where the
    # body says `%STATUS_NAME%` (a status not listed gets the name for 400).
    envoy_status_names: dict[int, str] | None = None
    # Full gRPC method names (`/pkg.Service/Method`) any caller may use without a key (TEI's /health, open in TEI).
    public_methods: tuple[str, ...] = ()
    # Default on or off (an operator changes it with `dialects.enabled` / `dialects.disabled`).
    enabled_by_default: bool = True
    # Free-form notes on the API: its name, routes, client, auth scheme (its OpenAPI fragment is service/openapi/<name>.yaml).
    doc: dict[str, str] = field(default_factory=dict)

    def schemes(self, rest: bool) -> tuple[Scheme, ...]:
        return self.rest_auth if rest and self.rest_auth is not None else self.auth


@lru_cache(maxsize=1)
def all_dialects() -> tuple[Dialect, ...]:
    """Every dialect module in this package that defines `DIALECT`, Inworld (the primary contract) first."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "DIALECT", None)
        if isinstance(spec, Dialect):
            found.append(spec)
    found.sort(key=lambda d: (d.name != "inworld", d.name))
    return tuple(found)


def by_name(name: str) -> Dialect | None:
    return next((d for d in all_dialects() if d.name == name), None)


@lru_cache(maxsize=None)
def dialect_of(method: str) -> Dialect | None:
    """`/pkg.Service/Method` → its dialect, or None for health, reflection and the like."""
    service = method.lstrip("/").split("/", 1)[0]
    return next((d for d in all_dialects() if service in d.services), None)


def enabled(config: Config) -> tuple[Dialect, ...]:
    """The dialects this configuration serves (Envoy's routes and the server's services follow it)."""
    wanted = config.dialects
    out = []
    for d in all_dialects():
        on = d.enabled_by_default
        if d.name in wanted.enabled:
            on = True
        if d.name in wanted.disabled:
            on = False
        if on:
            out.append(d)
    return tuple(out)
