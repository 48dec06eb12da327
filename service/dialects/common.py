"""Small pieces the REST dialects share: JSON bodies, reading google.protobuf.Value, headers."""

from __future__ import annotations

from typing import Any

import orjson
from google.api import httpbody_pb2
from google.protobuf import json_format, struct_pb2

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


def strings(raw: Any, param: str) -> list[str]:
    """A string or a list of strings, the common text input shape."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return raw
    if isinstance(raw, list) and not raw:
        raise errors.invalid_argument(f"'{param}' is an empty list; give at least one text.", param, "EMPTY_INPUT")
    if raw is None:
        raise errors.invalid_argument(f"'{param}' is required.", param, "EMPTY_INPUT")
    raise errors.invalid_argument(f"'{param}' must be a string or an array of strings.", param)
