"""Small pieces the REST dialects share: JSON bodies, reading google.protobuf.Value, headers."""

from __future__ import annotations

from typing import Any, Callable

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


def value(v: struct_pb2.Value | struct_pb2.Struct | None, param: str = "") -> Any:
    """A google.protobuf.Value (or Struct) as plain Python (None when absent or null). A native gRPC caller can put
    NaN or Infinity in a number, which JSON has no way to carry (json_format raises): a 400 naming the field."""
    if v is None or (isinstance(v, struct_pb2.Value) and v.WhichOneof("kind") in (None, "null_value")):
        return None
    try:
        return json_format.MessageToDict(v)
    except ValueError:
        raise errors.invalid_argument(f"'{param or 'value'}' holds NaN or Infinity, which JSON has no way to carry.", param) from None


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
        write_out = _writer(message_factory.GetMessageClass(method.output_type).SerializeToString)
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


def _writer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A method's response serializer that also takes an answer already in wire form (bytes), as large answers are
    built (tei: EmbedAllResponse from numpy, without a Python object per token)."""

    def write(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return write


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


def constant(body: httpbody_pb2.HttpBody):
    """The `work` of a method whose answer never changes (Ollama's version, the API reference's document)."""
    async def work() -> httpbody_pb2.HttpBody:
        return body

    return work


def as_message(message: Any, call: Any) -> Any:
    """A `to_core` for methods whose parsed message is all they need."""
    return message


def json_object(data: bytes, what: str = "request") -> dict[str, Any]:
    """A raw JSON request body (a route whose body Envoy passes through as google.api.HttpBody) as a dict.

    orjson refuses nesting past 1024 levels with a ValueError, so no body can exhaust the stack."""
    try:
        obj = orjson.loads(data)
    except ValueError:
        raise errors.invalid_argument(
            f"We could not parse the JSON body of your {what}. (HINT: This likely means you aren't using your HTTP library "
            "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)", None, "INVALID_JSON"
        ) from None
    if not isinstance(obj, dict):
        raise errors.invalid_argument(f"The body of your {what} must be a JSON object.", None, "INVALID_JSON")
    return obj


def typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    """data[key] when it is of `kind` (None when absent or null); a wrong type is a 400 naming the field."""
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise errors.invalid_argument(f"'{key}' must be {name}; got {v!r}.", key)
    if not isinstance(v, kind):
        raise errors.invalid_argument(f"'{key}' must be {name}; got {type(v).__name__}.", key)
    return v


def token_array(items: list[Any], where: str, param: str) -> np.ndarray:
    """A JSON array of token ids as int64, checked in bulk: non-negative integers below 2**31, no booleans."""
    if not items:
        raise errors.invalid_argument(f"'{where}' is an empty token array.", param, "EMPTY_INPUT")
    try:
        arr = np.asarray(items) if all(type(x) is int or type(x) is float for x in items) else None
    except OverflowError:
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        if arr is not None or all(type(x) in (int, float) for x in items):
            raise errors.invalid_argument(f"'{where}' must hold non-negative integer token ids below 2**31.", param)
        bad = next((x for x in items if type(x) not in (int, float)), items[0])
        raise errors.invalid_argument(f"'{where}' must hold non-negative integer token ids; got {bad!r}.", param)
    wrong = (arr < 0) | (arr >= 2**31) | (arr != np.floor(arr)) if arr.dtype.kind == "f" else (arr < 0) | (arr >= 2**31)
    if wrong.any():
        raise errors.invalid_argument(f"'{where}' must hold non-negative integer token ids; got {items[int(np.argmax(wrong))]!r}.", param)
    return arr.astype(np.int64)
