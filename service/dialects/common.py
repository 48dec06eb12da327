"""Small pieces the REST dialects share: JSON bodies, reading google.protobuf.Value, headers."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import orjson
from google.api import httpbody_pb2
from google.protobuf import json_format, message_factory, struct_pb2
from google.protobuf.descriptor import ServiceDescriptor

from .. import errors

JSON = "application/json"


def json_body(obj: Any) -> httpbody_pb2.HttpBody:
    """The exact JSON a dialect's clients expect; numpy float32 arrays print in their shortest form."""
    return httpbody_pb2.HttpBody(content_type=JSON, data=orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


def value(v: struct_pb2.Value | None) -> Any:
    """A google.protobuf.Value as plain Python (None when absent or null)."""
    if v is None or v.WhichOneof("kind") in (None, "null_value"):
        return None
    return json_format.MessageToDict(v)


def flag(text: str | None) -> bool | None:
    """A boolean request header (`x-use-cache: false`); None when absent."""
    if text is None:
        return None
    return text.strip().lower() in ("1", "true", "yes", "on")


def strings(v: struct_pb2.Value | None, param: str, max_inputs: int) -> list[str]:
    """A string or a list of strings (the common text input shape), read without converting the whole Value."""
    kind = v.WhichOneof("kind") if v is not None else None
    if kind == "string_value":
        return [v.string_value]
    if kind in (None, "null_value"):
        raise errors.invalid_argument(f"'{param}' is required.", param, "EMPTY_INPUT")
    if kind == "list_value":
        count_inputs(v, max_inputs, param)
        items = v.list_value.values
        if not items:
            raise errors.invalid_argument(f"'{param}' is an empty list; give at least one text.", param, "EMPTY_INPUT")
        if all(x.WhichOneof("kind") == "string_value" for x in items):
            return [x.string_value for x in items]
    raise errors.invalid_argument(f"'{param}' must be a string or an array of strings.", param)


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers `servicer`'s methods for `service`, with unary requests reaching them as raw bytes.

    The generated `add_*Servicer_to_server` would have gRPC parse every request on the event loop before the
    servicer runs; a servicer here calls `rpc.parse`, which parses a large body in an offload worker instead.
    Streamed requests are parsed by gRPC (each message of a stream is small).
    """
    handlers = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        parse_in = message_factory.GetMessageClass(method.input_type).FromString
        write_out = message_factory.GetMessageClass(method.output_type).SerializeToString
        if not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(behavior, None, write_out)
        elif not method.client_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(behavior, None, write_out)
        elif method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(behavior, parse_in, write_out)
        else:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(behavior, parse_in, write_out)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def count_inputs(v: struct_pb2.Value | None, max_inputs: int, param: str) -> None:
    """Refuses a list of more than `max_inputs` items before any of it is converted (its length costs nothing)."""
    if v is not None and v.WhichOneof("kind") == "list_value" and len(v.list_value.values) > max_inputs:
        raise errors.invalid_argument(
            f"Too many inputs: {len(v.list_value.values)}; at most {max_inputs} per request.", param, "TOO_MANY_INPUTS"
        )


def token_ids(values: Any, where: str, param: str) -> np.ndarray:
    """A ListValue of numbers as int64 token ids, checked in bulk (non-negative integers below 2**31)."""
    try:
        arr = np.fromiter((v.number_value if v.WhichOneof("kind") == "number_value" else np.nan for v in values), dtype=np.float64, count=len(values))
    except (TypeError, ValueError):
        arr = np.array([np.nan])
    if len(arr) == 0:
        raise errors.invalid_argument(f"'{where}' is an empty token array.", param, "EMPTY_INPUT")
    bad = ~np.isfinite(arr) | (arr < 0) | (arr >= 2**31) | (arr != np.floor(arr))
    if bad.any():
        i = int(np.argmax(bad))
        v = values[i]
        shown = v.number_value if v.WhichOneof("kind") == "number_value" else value(v)
        raise errors.invalid_argument(f"'{where}' must hold non-negative integer token ids; got {shown!r}.", param)
    return arr.astype(np.int64)


def as_message(message: Any, call: Any) -> Any:
    """A `to_core` for methods whose parsed message is all they need."""
    return message
