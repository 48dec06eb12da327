"""Envoy's configuration, rendered from the service's own configuration so the two cannot disagree.

`python -m service.envoy [--config FILE] > envoy.yaml` writes it; the committed `envoy.yaml` is the
rendering of the defaults (a test keeps it current), and `service.run` and the tests render their own
with the ports they use.

One listener takes both REST (transcoded to gRPC by the JSON transcoder) and native gRPC (passed
through). Error bodies: the server puts each dialect's own body in the `x-error-body` metadata and the
Lua filter swaps it in for the transcoder's `google.rpc.Status`; Envoy's own replies (malformed JSON,
unknown route, body too large, no upstream) are shaped per route by `local_reply_config`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from . import dialects
from .config import Config, load
from .errors import ERROR_BODY_HEADER, HTTP_STATUS_HEADER, RETRY_ELSEWHERE_HEADER

# Set by the Lua filter on requests that arrived as REST (the server reads it as metadata).
REST_MARK = "x-embed-rest"
ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "gen" / "descriptor.pb"


# Written by Envoy on every request it forwards: the address its caller's connection came from (the direct peer, never
# what X-Forwarded-For claims; anything a caller sent under this name is overwritten). An open service (no keys) refuses calls whose downstream is not loopback.
DOWNSTREAM_HEADER = "x-embed-downstream"


def keys_configured(config: Config, env: dict[str, str] | None = None) -> bool:
    """Whether the service this renders for will require keys (a keys file, or keys in its environment)."""
    from .auth import ENV_KEYS, KeysFileError, parse_env

    env = os.environ if env is None else env
    try:  # the server's own reading of $EMBED_API_KEYS: "," is no key at all
        from_env = bool(parse_env(env.get(ENV_KEYS, "")))
    except KeysFileError:
        from_env = False
    return bool(config.auth.keys_file) or from_env


def listen_host(config: Config, env: dict[str, str] | None = None) -> str:
    """Envoy's listener address: an open service stays on loopback, as the server itself does."""
    host = config.envoy.listen_host
    if not keys_configured(config, env) and not config.auth.allow_open_non_loopback and host not in ("127.0.0.1", "::1", "localhost"):
        return "127.0.0.1"
    return host


# google.rpc.Code for the HTTP statuses Envoy answers by itself.
GRPC_CODE_FOR_HTTP = {400: 3, 401: 16, 403: 7, 404: 5, 405: 12, 413: 3, 429: 8, 500: 13, 501: 12, 503: 14, 504: 4}

# Marks REST requests (before the transcoder turns them into gRPC) so Envoy's own error replies can be
# shaped per dialect for them and left alone for native gRPC callers; on the way back, swaps the server's
# error-body metadata in as the body and drops gRPC's headers from JSON responses.
LUA = f"""
function envoy_on_request(handle)
  local ctype = handle:headers():get("content-type") or ""
  if string.find(ctype, "application/grpc", 1, true) ~= 1 then
    -- The mark carries the REST path (without its query): a route shared by two APIs tells them apart by it. Only a
    -- short one: it travels as gRPC metadata, whose size the server bounds (8 KiB), and the routes compared are short.
    local path = string.match(handle:headers():get(":path") or "", "^[^?]*") or ""
    if path == "" or string.len(path) > 128 then
      path = "/"
    end
    handle:headers():replace("{REST_MARK}", path)
    -- Google's APIs also take the key as `?key=`: give it to the server as the header Gemini's clients send.
    if handle:headers():get("x-goog-api-key") == nil then
      -- Only from the query string (a `&key=` inside the path is part of a name, not a key).
      local query = string.match(handle:headers():get(":path") or "", "%?(.*)$")
      local key = query and string.match("&" .. query, "&key=([^&]*)")
      if key ~= nil and key ~= "" then
        key = string.gsub(key, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
        -- Only printable ASCII can be a header value; anything else is no key (the server then says which is missing).
        if string.find(key, "^[%w%-%._~:+/=]+$") then
          handle:headers():replace("x-goog-api-key", key)
        end
      end
    end
    {{GEMINI_MODELS}}
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local ctype = headers:get("content-type") or ""
  if string.find(ctype, "application/grpc", 1, true) == 1 then
    return
  end
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-accept-encoding")
  headers:remove("grpc-status-details-bin")
  headers:remove("{RETRY_ELSEWHERE_HEADER}")
  local status = headers:get("{HTTP_STATUS_HEADER}")
  if status ~= nil then
    headers:remove("{HTTP_STATUS_HEADER}")
    headers:replace(":status", status)
  end
  local body = headers:get("{ERROR_BODY_HEADER}")
  if body == nil then
    return
  end
  headers:remove("{ERROR_BODY_HEADER}")
  headers:replace("content-type", "application/json")
  local buffered = handle:body(true)
  if buffered ~= nil then
    buffered:setBytes(body)
  end
end
"""


# Where Gemini is served: GET /v1/models[/...] is OpenAI's and Gemini's (models.list, models.get), and a Google client's
# (it sends x-goog-api-key, ?key= or x-goog-api-client) goes to Gemini's /v1beta/ binding.
GEMINI_MODELS = """-- GET /v1/models[/...] is OpenAI's and Gemini's (models.list, models.get): a Google client's goes to Gemini's.
    local p = handle:headers():get(":path") or ""
    if handle:headers():get(":method") == "GET" and (string.find(p, "^/v1/models$") or string.find(p, "^/v1/models[/?]"))
        and (handle:headers():get("x-goog-api-key") ~= nil or handle:headers():get("x-goog-api-client") ~= nil) then
      handle:headers():replace(":path", "/v1beta" .. string.sub(p, 4))
    end"""


def lua(served: tuple[dialects.Dialect, ...]) -> str:
    """The Lua filter's code for the dialects served."""
    return LUA.replace("{GEMINI_MODELS}", GEMINI_MODELS if any(d.name == "gemini" for d in served) else "")


def _not_grpc() -> dict[str, Any]:
    return {"header_filter": {"header": {"name": REST_MARK, "present_match": True}}}


def _path_match(p: str) -> dict[str, Any]:
    """A path prefix, or (when it starts with `^`) a regular expression (RE2) that the whole path, query string
    included, must match: for a route that is a prefix of another API's (`/v1/embed` of `/v1/embeddings`)."""
    return {"safe_regex": {"regex": p}} if p.startswith("^") else {"prefix": p}


def _paths(prefixes: tuple[str, ...]) -> dict[str, Any]:
    filters = [{"header_filter": {"header": {"name": ":path", "string_match": _path_match(p)}}} for p in prefixes]
    return filters[0] if len(filters) == 1 else {"or_filter": {"filters": filters}}


def _status_is(http: int) -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": http, "runtime_key": f"local_reply.code_{http}"}}}}


def _with_status_name(body: Any, name: str) -> Any:
    """`body` with every `%STATUS_NAME%` replaced by `name`."""
    if isinstance(body, dict):
        return {k: _with_status_name(v, name) for k, v in body.items()}
    return name if body == "%STATUS_NAME%" else body


def _dialect_mappers(dialect: dialects.Dialect, prefixes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Envoy's replies to REST calls on `prefixes` in `dialect`'s body (one per status where the body names it)."""
    names = dialect.envoy_status_names or {}
    out = [{"filter": {"and_filter": {"filters": [_not_grpc(), _paths(prefixes), _status_is(http)]}},
            "body_format_override": {"json_format": _with_status_name(dialect.envoy_error_body, name)}} for http, name in names.items()]
    out.append({"filter": {"and_filter": {"filters": [_not_grpc(), _paths(prefixes)]}},
                "body_format_override": {"json_format": _with_status_name(dialect.envoy_error_body, names.get(400, ""))}})
    return out


def local_reply_config(served: tuple[dialects.Dialect, ...]) -> dict[str, Any]:
    """Envoy's own replies (malformed JSON, wrong types, body too large) in each dialect's error shape.

    A body parse error happens after the transcoder rewrote :path to the gRPC method, hence the service
    prefixes beside the REST ones. Routes of dialects without a body of their own (Inworld's, unknown paths)
    get google.rpc.Status JSON.
    """
    mappers = []
    for dialect in served:
        if dialect.envoy_error_body is not None:
            mappers += _dialect_mappers(dialect, (*dialect.rest_prefixes, *(f"/{s}/" for s in dialect.services)))
    # Then an unknown path in the shape of the API whose prefix it shares (`/api/v1/x` before `/api/x`).
    fallbacks = sorted(((p, d) for d in served if d.envoy_error_body is not None for p in d.fallback_prefixes), key=lambda pd: -len(pd[0]))
    for prefix, dialect in fallbacks:
        mappers += _dialect_mappers(dialect, (prefix,))
    for http, code in GRPC_CODE_FOR_HTTP.items():
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [_not_grpc(), _status_is(http)]}},
                "body_format_override": {"json_format": {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []}},
            }
        )
    mappers.append(
        {"filter": _not_grpc(), "body_format_override": {"json_format": {"code": 2, "message": "%LOCAL_REPLY_BODY%", "details": []}}}
    )
    return {"mappers": mappers}


def _local(host: str) -> str:
    return host if host not in ("0.0.0.0", "::") else "127.0.0.1"


# Ollama's Go client checks the server is up with HEAD / (its Heartbeat), and tools probe HEAD /api/version and
# /api/tags: Ollama answers 200 with no body. The transcoder maps only the methods the protos bind (GET), so Envoy
# answers these itself; they say nothing but that the service is up.
OLLAMA_HEAD_PATHS = ("/", "/api/version", "/api/tags")


def ollama_heartbeats(served) -> list[dict[str, Any]]:
    if not any(d.name == "ollama" for d in served):
        return []
    skip = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    return [{"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "HEAD"}}]},
             # Past the transcoder (which would refuse a method no proto binds) and the buffer: Envoy answers.
             "typed_per_filter_config": {"envoy.filters.http.grpc_json_transcoder": skip, "envoy.filters.http.buffer": skip},
             "direct_response": {"status": 200}} for path in OLLAMA_HEAD_PATHS]


# What a browser may send and read cross-origin: every API's auth header (a bearer token is never sent unless listed),
# any other (`*`: the SDKs' own, x-stainless-* and x-goog-api-client), and the headers the APIs answer with.
CORS_ALLOW_HEADERS = "authorization,content-type,x-api-key,x-goog-api-key,x-token-ids,*"
CORS_EXPOSE_HEADERS = ("x-request-id,x-cache,retry-after,x-compute-time,x-compute-tokens,x-compute-characters,x-total-time,"
                       "x-tokenization-time,x-queue-time,x-inference-time,openai-processing-ms")


def cors_policy(origins: list[str]) -> dict[str, Any]:
    """`envoy.cors_allow_origins` as the virtual host's CORS policy; none (no headers at all) when empty."""
    if not origins:
        return {}
    match = [{"safe_regex": {"regex": ".*"}}] if "*" in origins else [{"exact": o} for o in origins]
    return {"typed_per_filter_config": {"envoy.filters.http.cors": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": match,
        "allow_methods": "GET,POST,HEAD,OPTIONS",
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "max_age": "86400",
    }}}


def render(config: Config, upstreams: list[tuple[str, int]] | None = None, descriptor: Path | str = DESCRIPTOR,
           metrics_upstream: tuple[str, int] | None = None) -> dict[str, Any]:
    """The Envoy bootstrap for `config`, forwarding to `upstreams` (default: the configured gRPC server) and serving
    `metrics_upstream`'s /metrics (default: the configured server's; none when there are several servers)."""
    env = config.envoy
    served = dialects.enabled(config)
    upstreams = upstreams or [(_local(config.server.host), config.server.grpc_port)]
    if metrics_upstream is None and len(upstreams) == 1 and config.server.metrics:
        metrics_upstream = (_local(config.server.host), config.server.metrics_port)
    timeout = f"{env.route_timeout_seconds:g}s"
    host = listen_host(config)
    rest_route = {
        "match": {"prefix": "/"},
        # The transcoder keeps the caller's whole path (query included) in this header; sent on as gRPC metadata, a long
        # one passed the server's metadata bound and came back a 429. The server never reads it.
        "request_headers_to_remove": ["x-envoy-original-path"],
        "request_headers_to_add": [
            {
                "header": {"key": DOWNSTREAM_HEADER, "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "route": {
            "cluster": "embedding_grpc",
            "timeout": timeout,
            "max_stream_duration": {"grpc_timeout_header_max": timeout},
            # Embedding is idempotent: a request a replica could not answer (it died, reset the
            # stream, or said so: draining, model loading) is tried on another one. Nothing else
            # is retried here: an upstream provider's failure was already retried by the server,
            # so one request has one retry budget end to end.
            "retry_policy": {
                "retry_on": "connect-failure,refused-stream,reset,retriable-headers",
                "retriable_headers": [{"name": RETRY_ELSEWHERE_HEADER, "present_match": True}],
                "num_retries": env.retries,
                "per_try_timeout": timeout,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
                    }
                ],
                # Fewest-requests balancing favours a replica that just died (it holds no requests any more): each
                # pick lands on it 3 times in 4 while it is still in rotation, so with 10 re-picks about 1 retry in 25
                # went back to it. 50 re-picks: fewer than 1 in a million. (They cost nothing until a retry.)
                "host_selection_retry_max_attempts": 50,
            },
        },
    }
    grpc_route = {
        **copy.deepcopy(rest_route),
        "match": {"prefix": "/", "headers": [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}]},
        "typed_per_filter_config": {
            "envoy.filters.http.buffer": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute", "disabled": True}
        },
    }
    # A streaming RPC (TEI's EmbedStream and its kin) lives as long as its caller has texts: 100,000 of them take
    # minutes. The route timeout would cut it whole, so a stream has none: it ends when its caller's deadline (the
    # grpc-timeout header, unmodified) passes or when it is idle for the route timeout. It is never retried: a
    # stream's messages cannot be replayed.
    stream_route = copy.deepcopy(grpc_route)
    stream_route["match"]["safe_regex"] = {"regex": "^/[^/]+/[A-Za-z]+Stream$"}
    del stream_route["match"]["prefix"]
    stream_route["route"].pop("retry_policy")
    stream_route["route"].update(timeout="0s", idle_timeout=timeout, max_stream_duration={"grpc_timeout_header_max": "0s"})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "embeddings",
        # HTTP/1.1 for REST clients and h2c for native gRPC callers, on the one port.
        "codec_type": "AUTO",
        "generate_request_id": True,
        # A caller must send its headers promptly; a stalled body is cut by Envoy's stream idle timeout (5 min).
        "request_headers_timeout": "10s",
        # A connection with no request in flight is closed after this (Envoy's default is an hour: 4,100 idle
        # connections held the whole connection budget); gRPC and HTTP/2 clients reconnect on their own.
        "common_http_protocol_options": {"idle_timeout": f"{env.idle_timeout_seconds:g}s"},
        # Streams one HTTP/2 connection may carry at once (Envoy's default is 2**31 - 1).
        "http2_protocol_options": {"max_concurrent_streams": env.max_streams_per_connection, **h2_windows()},
        # A request id from the caller (or the mesh's ingress) is kept, so one id follows the request everywhere.
        "preserve_external_request_id": True,
        "route_config": {
            "name": "embeddings",
            "virtual_hosts": [
                {
                    "name": "embeddings",
                    "domains": ["*"],
                    # After transcoding every path is a gRPC method path: one route serves all.
                    # Native gRPC first: its streams pass through unbuffered (TEI's EmbedStream streams both ways); the
                    # buffer filter's body limit is for REST, and the server bounds gRPC messages itself.
                    "routes": [stream_route, grpc_route, *ollama_heartbeats(served), rest_route],
                    **cors_policy(env.cors_allow_origins),
                }
            ],
        },
        "local_reply_config": local_reply_config(served),
        "http_filters": [
            # First: a browser's preflight (OPTIONS) is answered here, before anything marks it a REST call to reshape.
            {"name": "envoy.filters.http.cors", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
            # Listed before the transcoder, so it sees responses after the transcoder made them JSON.
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua(served)},
                },
            },
            # The transcoder streams a large body through instead of refusing it: this makes the limit real (413).
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": env.max_request_bytes,
                },
            },
            {
                "name": "envoy.filters.http.grpc_json_transcoder",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                    "proto_descriptor": str(descriptor),
                    "services": [name for d in served for name in d.services],
                    "print_options": {
                        "add_whitespace": False,
                        # `"index": 0`, `"tokenCount": 0`: every field present, as clients expect.
                        "always_print_primitive_fields": True,
                        "always_print_enums_as_ints": False,
                        # Inworld's JSON is camelCase (serviceProvider, tokenCount), as grpc-gateway prints it.
                        "preserve_proto_field_names": False,
                    },
                    "convert_grpc_status": True,
                    "request_validation_options": {"reject_unknown_method": True, "reject_unknown_query_parameters": False},
                    "ignore_unknown_query_parameters": True,
                    # `/v1/models/a%2Fb` (the OpenAI SDK escapes slashes in ids) must reach us as `a/b`.
                    "url_unescape_spec": "ALL_CHARACTERS",
                    "max_request_body_size": env.max_request_bytes,
                    "max_response_body_size": env.max_response_bytes,
                },
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    listeners = [
        {
            "name": "embeddings",
            "address": {"socket_address": {"address": host, "port_value": env.listen_port}},
            "per_connection_buffer_limit_bytes": 1024 * 1024,
            # A connection that sends nothing is closed after FIRST_BYTES_SECONDS: request_headers_timeout starts only
            # at the first byte, so silent connections would otherwise sit until the idle timeout, holding the budget.
            **first_bytes(FIRST_BYTES_SECONDS),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
        }
    ]
    clusters = [grpc_cluster(upstreams)]
    if env.readiness:
        listeners.append(readiness_listener(host, env.readiness_port, len(upstreams)))
    if env.metrics_port and metrics_upstream is not None:
        listeners.append(metrics_listener(host, env.metrics_port))
        clusters += [metrics_cluster("server_metrics", *metrics_upstream), metrics_cluster("envoy_admin", "127.0.0.1", env.admin_port)]
    return {
        "overload_manager": overload_manager(env.max_heap_bytes, env.max_connections),
        # Never beyond loopback: the admin interface can stop Envoy. Probes use the readiness listener.
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": env.admin_port}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    }


def grpc_cluster(upstreams: list[tuple[str, int]]) -> dict[str, Any]:
    """The gRPC servers, health-checked by their own gRPC health service."""
    return {
        "name": "embedding_grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        # Fewest outstanding requests: a replica busy with a big batch gets less new work.
        "lb_policy": "LEAST_REQUEST",
        # The server's own gRPC health: NOT_SERVING while its model loads or while it drains.
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                # Also before the cluster's first request (default 60 s): readiness follows the server at once.
                "no_traffic_interval": "2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
        # Envoy allows 3 concurrent retries per cluster by default: when a replica dies under load,
        # every request it held is retried at once, so allow a retry for each request in flight.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": 1024, "max_requests": 4096, "max_pending_requests": 4096}]},
        "outlier_detection": {
            # Connection failures (a replica that died) eject it at once, before its health check fails.
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 2,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": h2_windows()},
            }
        },
        "load_assignment": {
            "cluster_name": "embedding_grpc",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in upstreams]}
            ],
        },
    }


# Seconds a new connection has to send its first bytes.
FIRST_BYTES_SECONDS = 5
# HTTP/2 flow-control windows (Envoy's defaults are 256 MiB a stream, which it would buffer for a caller that
# writes and never reads): a stream that stops reading stops its caller within this much.
STREAM_WINDOW_BYTES = 1024 * 1024
CONNECTION_WINDOW_BYTES = 4 * 1024 * 1024


def first_bytes(seconds: float) -> dict[str, Any]:
    """Listener options: a connection that sends nothing for `seconds` is closed (the http_inspector listener filter
    waits for the first bytes; on its timeout the connection goes)."""
    return {
        "listener_filters": [{"name": "envoy.filters.listener.http_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
        "listener_filters_timeout": f"{seconds:g}s",
        "continue_on_listener_filters_timeout": False,
    }


def h2_windows() -> dict[str, int]:
    return {"initial_stream_window_size": STREAM_WINDOW_BYTES, "initial_connection_window_size": CONNECTION_WINDOW_BYTES}


def overload_manager(max_heap_bytes: int, max_connections: int) -> dict[str, Any]:
    """Envoy's bounds on itself: its heap (streams that buffer the most are reset first, then new requests wait) and
    its downstream connections."""
    heap = "envoy.resource_monitors.fixed_heap"
    return {
        "refresh_interval": "0.25s",
        # Per-stream memory accounts (from 1 MiB), so that the streams holding the most can be found and reset.
        "buffer_factory_config": {"minimum_account_to_track_power_of_two": 20},
        "resource_monitors": [
            {"name": heap, "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": max_heap_bytes}},
            {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": max_connections}},
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": [{"name": heap, "threshold": {"value": 0.9}}]},
            {"name": "envoy.overload_actions.reset_high_memory_stream",
             "triggers": [{"name": heap, "scaled": {"scaling_threshold": 0.85, "saturation_threshold": 0.95}}]},
            {"name": "envoy.overload_actions.stop_accepting_requests", "triggers": [{"name": heap, "threshold": {"value": 0.95}}]},
            # Short of memory, idle connections and stalled streams go sooner (down to 2 s and a tenth).
            {"name": "envoy.overload_actions.reduce_timeouts",
             "triggers": [{"name": heap, "scaled": {"scaling_threshold": 0.8, "saturation_threshold": 0.95}}],
             "typed_config": {
                 "@type": "type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                 "timer_scale_factors": [
                     {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "2s"},
                     {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_scale": {"value": 10}},
                 ]}},
        ],
    }


def readiness_listener(host: str, port: int, replicas: int) -> dict[str, Any]:
    """A listener that answers only `GET /ready`: 200 while at least one local server passes Envoy's gRPC health
    check (all of them for a pod's one server) and Envoy is not draining, else 503; every other path is 404.

    It is what the kubelet probes, on the pod's address, without exposing the admin interface. It also passes the
    gRPC health service's `Check` (only that: no `Watch` stream) to the server, so that the kubelet's gRPC probes reach
    a server that listens on loopback behind this Envoy.
    """
    health_check = {
        "match": {"path": "/grpc.health.v1.Health/Check", "headers": [{"name": "content-type", "string_match": {"prefix": "application/grpc"}}]},
        "route": {"cluster": "embedding_grpc", "timeout": "5s"},
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "readiness",
        "codec_type": "AUTO",
        **_tight_connection_options(),
        "route_config": {
            "name": "readiness",
            "virtual_hosts": [
                {"name": "readiness", "domains": ["*"], "routes": [health_check, {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.health_check",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                    "pass_through_mode": False,
                    "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}],
                    # Healthy hosts as a percentage: one of `replicas` is enough.
                    "cluster_min_healthy_percentages": {"embedding_grpc": {"value": round(100.0 / replicas - 0.01, 2)}},
                },
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "name": "readiness",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": 32 * 1024,
        # Probes come and go at once: a connection silent for 2 s goes, and the API's connection budget never shuts
        # the probes out (this listener has its own limit, below).
        **first_bytes(2),
        "ignore_global_conn_limit": True,
        "filter_chains": [{"filters": [_connection_limit("readiness", 64),
                                       {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


# Envoy's metrics listener: at most this many scrapes a second (more are answered 429), over at most this many
# connections (more are closed at once); the server's own /metrics sees Envoy's few connections, never a caller's.
METRICS_RATE_PER_SECOND = 20
METRICS_MAX_CONNECTIONS = 64


def _tight_connection_options() -> dict[str, Any]:
    """For the small listeners (readiness, metrics): a caller sends its request at once, and idles briefly."""
    return {
        "request_headers_timeout": "5s",
        "stream_idle_timeout": "10s",
        "request_timeout": "10s",
        "common_http_protocol_options": {"idle_timeout": "30s", "max_requests_per_connection": 100},
    }


def _connection_limit(name: str, limit: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.connection_limit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
            "stat_prefix": f"{name}_connection_limit",
            "max_connections": limit,
        },
    }


def metrics_listener(host: str, port: int) -> dict[str, Any]:
    """`GET /metrics` (the server's Prometheus metrics) and `GET /stats/prometheus` (Envoy's own), and nothing else,
    under a connection limit, short timeouts and a rate limit: a flood of connections or scrapes is Envoy's to absorb
    (the server's own metrics endpoint, on loopback, sees at most two of Envoy's connections)."""
    def get(path: str, cluster: str) -> dict[str, Any]:
        return {"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                "route": {"cluster": cluster, "timeout": "5s"}}

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "metrics",
        "codec_type": "AUTO",
        **_tight_connection_options(),
        "route_config": {
            "name": "metrics",
            "virtual_hosts": [{
                "name": "metrics",
                "domains": ["*"],
                "routes": [get("/metrics", "server_metrics"), get("/stats/prometheus", "envoy_admin"),
                           {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "GET /metrics or GET /stats/prometheus\n"}}}],
            }],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                    "stat_prefix": "metrics_rate_limit",
                    "token_bucket": {"max_tokens": METRICS_RATE_PER_SECOND, "tokens_per_fill": METRICS_RATE_PER_SECOND, "fill_interval": "1s"},
                    "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                    "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                },
            },
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    return {
        "name": "metrics",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "per_connection_buffer_limit_bytes": 32 * 1024,
        **first_bytes(2),
        "filter_chains": [{"filters": [_connection_limit("metrics", METRICS_MAX_CONNECTIONS),
                                       {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }


def metrics_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    """A plain HTTP/1.1 upstream on loopback, held to two connections (a scrape takes milliseconds)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 2, "max_pending_requests": 16, "max_requests": 2}]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }


def dump(doc: dict[str, Any]) -> str:
    header = "# Generated by `python -m service.envoy` from the service configuration; do not edit by hand.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.envoy", description="Print the Envoy configuration.")
    p.add_argument("--config", help="the service's YAML configuration")
    p.add_argument("--descriptor", default="gen/descriptor.pb", help="path Envoy reads the descriptor set from")
    args = p.parse_args(argv)
    sys.stdout.write(dump(render(load(args.config), descriptor=args.descriptor)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
