"""HrFlow's `POST /v1/document/embedding`: a profile or job object in, base64 of `>f4` bytes out.

The item's text is its `text` field when present and non-empty; otherwise it is built from the item's
parts, one line each, in the order below (empty parts skipped). Entries of a list of objects become
"title, company: description"-like lines; lists of named things become "Skills: a, b, c".

- profile: info.summary (or summary); experiences (title, company, description); educations (title, school,
  description); skills; languages; certifications; courses; tasks; interests; tags
- job: name; summary; sections (title or name, description); culture; responsibilities; requirements;
  benefits; interviews; skills; languages; certifications; courses; tasks; interests; tags

`return_sequences: true` returns one row per token (the model's token embeddings) instead of one vector;
either way the SDK's `decode_float_list` reshapes `data` with (-1, dimension).
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import orjson
from google.api import httpbody_pb2

from embedding.dialects.v1 import hrflow_pb2 as pb

from .. import auth, errors, rpc
from ..engine.encoding import base64_float32
from ..engine.pipeline import EmbedRequest, Embedder
from . import Dialect
from .common import add_servicer, json_body, value

ITEM_TYPES = ("profile", "job")

# (field, how): "text" a string, "entries" a list of objects (with their keys in order), "names" a list of named things.
Part = tuple[str, str, tuple[str, ...]]
# Lists of named things both item types end with, in this order.
NAMED_LISTS: list[Part] = [(f, "names", ()) for f in ("skills", "languages", "certifications", "courses", "tasks", "interests", "tags")]
PROFILE_PARTS: list[Part] = [
    ("info.summary", "text", ()),
    ("summary", "text", ()),
    ("experiences", "entries", ("title", "company", "description")),
    ("educations", "entries", ("title", "school", "description")),
    *NAMED_LISTS,
]
JOB_PARTS: list[Part] = [
    ("name", "text", ()),
    ("summary", "text", ()),
    ("sections", "entries", ("title", "name", "description")),
    *[(f, "text", ()) for f in ("culture", "responsibilities", "requirements", "benefits", "interviews")],
    *NAMED_LISTS,
]


def _get(item: dict[str, Any], dotted: str) -> Any:
    node: Any = item
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _clean(v: Any) -> str:
    return v.strip() if isinstance(v, str) else ""


def item_text(item: dict[str, Any], item_type: str) -> str:
    """The text embedded for an item (see the module docstring for the rule)."""
    text = _clean(item.get("text"))
    if text:
        return text
    lines: list[str] = []
    for field, how, keys in PROFILE_PARTS if item_type == "profile" else JOB_PARTS:
        node = _get(item, field)
        if how == "text":
            if _clean(node):
                lines.append(_clean(node))
        elif how == "entries" and isinstance(node, list):
            for entry in node:
                if not isinstance(entry, dict):
                    continue
                head = ", ".join(_clean(entry.get(k)) for k in keys[:-1] if _clean(entry.get(k)))
                tail = _clean(entry.get(keys[-1]))
                line = f"{head}: {tail}" if head and tail else head or tail
                if line:
                    lines.append(line)
        elif how == "names" and isinstance(node, list):
            names = [_clean(x.get("name")) if isinstance(x, dict) else _clean(x) for x in node]
            names = [n for n in names if n]
            if names:
                lines.append(f"{field.capitalize()}: {', '.join(names)}")
    return "\n".join(lines)


def _return_sequences(raw: Any) -> bool:
    if raw is None:
        return False
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise errors.invalid_argument(f"Invalid return_sequences: {raw!r} (use true or false)", "return_sequences")


def to_core(request: pb.DocumentEmbeddingRequest, call: rpc.Call) -> EmbedRequest:
    if request.item_type not in ITEM_TYPES:
        raise errors.invalid_argument(f"Invalid Item Type: {request.item_type}", "item_type", "INVALID_ITEM_TYPE")
    item = value(request.item, "item") if request.HasField("item") else None
    if isinstance(item, str):
        try:
            # orjson refuses nesting deeper than 1024 levels with a ValueError (json.loads would overflow the stack).
            item = orjson.loads(item)
        except ValueError:
            raise errors.invalid_argument("Invalid Item: not a JSON object (or nested too deeply)", "item") from None
    if not isinstance(item, dict):
        raise errors.invalid_argument("Invalid Item: expected a profile or job object", "item")
    text = item_text(item, request.item_type)
    if not text:
        raise errors.invalid_argument(f"Invalid Item: the {request.item_type} has no text to embed", "item", "EMPTY_INPUT")
    want_tokens = _return_sequences(value(request.return_sequences, "return_sequences") if request.HasField("return_sequences") else None)
    # Documents are long: like sentence-transformers, read what fits and cut the rest (`dialects.long_inputs.hrflow`).
    return EmbedRequest(inputs=[text], token_embeddings=want_tokens, long_inputs=call.long_inputs, deadline=call.deadline, param="item")


def to_body(rows: np.ndarray) -> httpbody_pb2.HttpBody:
    return json_body({"code": 200, "message": "Embedding results", "data": base64_float32(rows, byteorder="big")})


class HrFlowServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def DocumentEmbedding(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            core = await rpc.parse(raw, pb.DocumentEmbeddingRequest, to_core, rpc.call(context, self.embedder.limits.max_client_batch_size))
            result = await self.embedder.embed(core)
            await rpc.respond(context, result)
            rows = result.token_embeddings[0] if core.token_embeddings and result.token_embeddings else result.vectors
            return to_body(rows)  # base64: fast at any size

        return await rpc.handle(context, DIALECT, work)


# HrFlow's SDK sends its `api_secret` as X-API-KEY and `api_user` as X-USER-EMAIL; the messages are HrFlow's.
API_KEY = auth.HeaderKey(
    "X-API-KEY",
    requires=("X-USER-EMAIL",),
    how="X-API-KEY: <key> and X-USER-EMAIL: <email>",
    missing="Unauthorized. Missing secret key: send X-API-KEY and X-USER-EMAIL.",
    missing_required="Unauthorized. Missing user email: send X-USER-EMAIL.",
    invalid="Unauthorized. Invalid secret key: {key}",
)

DIALECT = Dialect(
    name="hrflow",
    services=(pb.DESCRIPTOR.services_by_name["HrFlow"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["HrFlow"], HrFlowServicer(embedder)),
    auth=(API_KEY,),
    error_body=lambda err: {"code": err.http_status, "message": err.message},
    rest_prefixes=("/v1/document/",),
    envoy_error_body={"code": "%RESPONSE_CODE%", "message": "%LOCAL_REPLY_BODY%"},
    doc={"api": "HrFlow document embedding (000)", "routes": "`POST /v1/document/embedding`",
         "client": "`hrflow==1.9.0`", "auth": "`X-API-KEY` + `X-USER-EMAIL`"},
)
