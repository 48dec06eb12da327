"""Google's Gemini API embeddings: `models/{model}:embedContent` and `:batchEmbedContents`, under /v1beta/ and /v1/.

- A content's text is its parts' `text`s joined by a space (other parts are not counted, as Google's API says).
- `taskType` (any casing) picks the model's prompt for it where the model has one: RETRIEVAL_QUERY →
  `retrieval_query` or `query`; RETRIEVAL_DOCUMENT → `retrieval_document`, `document` or `passage`;
  SEMANTIC_SIMILARITY → `semantic_similarity` or `similarity`; CLASSIFICATION, CLUSTERING → the prompt of that
  name; QUESTION_ANSWERING, FACT_VERIFICATION, CODE_RETRIEVAL_QUERY → the prompt of that name, else `query`
  (they embed the query side of their task). None of them (or TASK_TYPE_UNSPECIFIED): the model's default.
- `title` (RETRIEVAL_DOCUMENT only, as Google documents it; ignored with other tasks): a sentence-transformers
  model has no title slot, so the document is embedded as `title + " " + text`, the way BEIR (the benchmark
  these models are evaluated on) joins a title to its passage.
- `outputDimensionality`: the first N components, normalized again; above the model's dimension is a 400.
- In a batch every request names its model (`models/...`), which must be the URL's; requests may differ in
  task and dimensionality.
- `GET models/{model}` and `GET models` (`models.get`, `models.list`): Google's Model resource for every served name,
  `supportedGenerationMethods` the two embedding methods. Under /v1/ they share OpenAI's paths: Envoy sends a Google
  client's GET there (it carries `x-goog-api-key`, `?key=` or `x-goog-api-client`) to the /v1beta/ binding.

Auth: the `x-goog-api-key` header or `?key=` (Envoy's Lua filter copies the query parameter into the header),
or `Authorization: Bearer`. Errors are Google's `{"error": {"code", "message", "status"}}`: a missing key is
403 PERMISSION_DENIED and a wrong one 400 INVALID_ARGUMENT (reason API_KEY_INVALID), as Google answers them.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
from google.api import httpbody_pb2

from embedding.dialects.v1 import gemini_pb2 as pb

from .. import auth, errors, rpc
from ..engine.pipeline import EmbedRequest, EmbedResult, Embedder
from . import Dialect
from ._shared import cut, served_model, task_prompt
from .common import add_servicer, as_message, json_body

TASK_TYPES: dict[str, tuple[str, ...]] = {
    "TASK_TYPE_UNSPECIFIED": (),
    "RETRIEVAL_QUERY": ("retrieval_query", "query"),
    "RETRIEVAL_DOCUMENT": ("retrieval_document", "document", "passage"),
    "SEMANTIC_SIMILARITY": ("semantic_similarity", "similarity"),
    "CLASSIFICATION": ("classification",),
    "CLUSTERING": ("clustering",),
    "QUESTION_ANSWERING": ("question_answering", "query"),
    "FACT_VERIFICATION": ("fact_verification", "query"),
    "CODE_RETRIEVAL_QUERY": ("code_retrieval_query", "query"),
}
MODELS = "models/"
# google.rpc.Code names by the HTTP status Google answers with.
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
          408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
          500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
MISSING_KEY = ("Method doesn't allow unregistered callers (callers without established identity). "
               "Please use API Key or other form of API consumer identity to call this API.")
INVALID_KEY = "API key not valid. Please pass a valid API key."


def http_status(err: errors.ServiceError) -> int:
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        return 403 if err.reason == "missing_api_key" else 400
    return err.http_status


def error_body(err: errors.ServiceError) -> dict[str, Any]:
    status = http_status(err)
    body: dict[str, Any] = {"code": status, "message": err.message, "status": STATUS.get(status, err.code.name)}
    if err.code == grpc.StatusCode.UNAUTHENTICATED:
        if status == 403:
            body["message"] = MISSING_KEY
        else:
            body["message"] = INVALID_KEY
            body["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com",
                                "metadata": {"service": "generativelanguage.googleapis.com"}}]
    return {"error": body}


def model_id(name: str, where: str) -> str:
    """`models/{id}` → id (ids may hold slashes)."""
    if not name.startswith(MODELS):
        raise errors.invalid_argument(f"{where} must be `models/{{model}}`; got {name!r}.", where)
    return name[len(MODELS):]


def _item(request: pb.GeminiEmbedContentRequest, where: str) -> tuple[str, tuple[str, ...], int | None]:
    """One content: its text, the prompts its task may use, its output dimensionality."""
    text = " ".join(p.text for p in request.content.parts if p.text)
    if not text:
        raise errors.invalid_argument(f"{where}content must have at least one part with text.", f"{where}content", "EMPTY_INPUT")
    task = request.task_type.upper() or "TASK_TYPE_UNSPECIFIED"
    if task not in TASK_TYPES:
        raise errors.invalid_argument(f"Invalid value at '{where}task_type' (TaskType), {request.task_type!r}.", f"{where}task_type")
    if request.title and task == "RETRIEVAL_DOCUMENT":
        text = f"{request.title} {text}"
    dims = request.output_dimensionality if request.HasField("output_dimensionality") else None
    if dims is not None and dims < 1:
        raise errors.invalid_argument(f"{where}output_dimensionality must be at least 1; got {dims}.", f"{where}output_dimensionality")
    return text, TASK_TYPES[task], dims


def _core(texts: list[str], model: str, call: rpc.Call, prompts: tuple[str, ...], rows: list[int], dims: list[int | None]) -> EmbedRequest:
    return EmbedRequest(inputs=texts, model=model, deadline=call.deadline, param="content", long_inputs=call.long_inputs,
                        echo={"prompts": prompts, "rows": rows, "dims": dims})


def to_core(request: pb.GeminiEmbedContentRequest, call: rpc.Call) -> list[EmbedRequest]:
    model = model_id(request.model, "model")
    text, prompts, dims = _item(request, "")
    return [_core([text], model, call, prompts, [0], [dims])]


def to_core_batch(request: pb.GeminiBatchEmbedContentsRequest, call: rpc.Call) -> list[EmbedRequest]:
    """One core request per task (a batch's requests may differ in task, and so in prompt), rows kept in order."""
    model = model_id(request.model, "model")
    if not request.requests:
        raise errors.invalid_argument("requests must hold at least one request.", "requests", "EMPTY_INPUT")
    if len(request.requests) > call.max_inputs:
        raise errors.invalid_argument(f"Too many requests: {len(request.requests)}; at most {call.max_inputs} per batch.", "requests", "TOO_MANY_INPUTS")
    groups: dict[tuple[str, ...], tuple[list[str], list[int], list[int | None]]] = {}
    for i, item in enumerate(request.requests):
        where = f"requests[{i}]."
        if item.model and model_id(item.model, f"{where}model") != model:
            raise errors.invalid_argument(f"{where}model ({item.model}) must be the model of the URL (models/{model}).", f"{where}model")
        text, prompts, dims = _item(item, where)
        texts, rows, dimss = groups.setdefault(prompts, ([], [], []))
        texts.append(text)
        rows.append(i)
        dimss.append(dims)
    return [_core(texts, model, call, prompts, rows, dims) for prompts, (texts, rows, dims) in groups.items()]


def to_body(vectors: np.ndarray, dims: list[int | None], single: bool) -> httpbody_pb2.HttpBody:
    rows = [cut(vectors[i : i + 1], d)[0] for i, d in enumerate(dims)]
    if single:
        return json_body({"embedding": {"values": rows[0]}})
    return json_body({"embeddings": [{"values": r} for r in rows]})


def merge(results: list[EmbedResult], cores: list[EmbedRequest], n: int) -> EmbedResult:
    """The groups' results as one, rows back in request order."""
    if len(results) == 1:
        return results[0]
    dim = results[0].vectors.shape[1]
    vectors = np.empty((n, dim), dtype=np.float32)
    counts = [0] * n
    for result, core in zip(results, cores):
        vectors[core.echo["rows"]] = result.vectors
        for row, count in zip(core.echo["rows"], result.token_counts):
            counts[row] = count
    slowest = max(results, key=lambda r: r.timings.total)
    return EmbedResult(model=results[0].model, vectors=vectors, token_counts=counts, cache_hits=sum(r.cache_hits for r in results),
                       timings=replace(slowest.timings), truncated=sum(r.truncated for r in results),
                       chunked=sum(r.chunked for r in results))


# Google's models.list: 50 per page unless asked, at most 1000.
PAGE_SIZE, MAX_PAGE_SIZE = 50, 1000
METHODS = ["embedContent", "batchEmbedContents"]


def model_resource(name: str, embedder: Embedder) -> dict[str, Any]:
    """Google's Model resource for a served name (facts of a model not loaded yet are left out, never loaded here)."""
    config = embedder.registry.config(name)
    state, model = embedder.registry.peek(name)
    out: dict[str, Any] = {"name": MODELS + name, "baseModelId": config.id, "version": getattr(model, "commit", "") or "1",
                           "displayName": name, "description": f"{config.id}: text embeddings"}
    if state == "loaded" and model is not None:
        out["description"] = f"{config.id}: text embeddings of {model.dimension} dimensions"
        out["inputTokenLimit"] = model.tokenizer.max_seq_length
    elif config.max_seq_length:
        out["inputTokenLimit"] = config.max_seq_length
    out.update(outputTokenLimit=1, supportedGenerationMethods=METHODS)
    return out


def page(names: list[str], request: pb.GeminiListModelsRequest) -> tuple[list[str], str]:
    """One page of `names` and the next page's token ('' after the last)."""
    if request.page_size < 0:
        raise errors.invalid_argument(f"page_size must not be negative; got {request.page_size}.", "page_size")
    size = min(request.page_size or PAGE_SIZE, MAX_PAGE_SIZE)
    start = 0
    if request.page_token:
        if not re.fullmatch(r"[0-9]{1,9}", request.page_token) or int(request.page_token) > len(names):
            raise errors.invalid_argument("Invalid page token.", "page_token")
        start = int(request.page_token)
    end = start + size
    return names[start:end], str(end) if end < len(names) else ""


class GeminiServicer:
    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def GetModel(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            request = await rpc.parse(raw, pb.GeminiGetModelRequest, as_message, rpc.Call())
            names = self.embedder.registry.names()
            if request.model not in names:
                raise errors.model_not_found(request.model, names)
            return json_body(model_resource(request.model, self.embedder))

        return await rpc.handle(context, DIALECT, work)

    async def ListModels(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            request = await rpc.parse(raw, pb.GeminiListModelsRequest, as_message, rpc.Call())
            names, token = page(self.embedder.registry.names(), request)
            body: dict[str, Any] = {"models": [model_resource(n, self.embedder) for n in names]}
            if token:
                body["nextPageToken"] = token
            return json_body(body)

        return await rpc.handle(context, DIALECT, work)

    async def EmbedContent(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._embed(raw, context, pb.GeminiEmbedContentRequest, to_core, single=True)

    async def BatchEmbedContents(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await self._embed(raw, context, pb.GeminiBatchEmbedContentsRequest, to_core_batch, single=False)

    async def _embed(self, raw: bytes, context: grpc.aio.ServicerContext, message: Any, convert: Any, single: bool) -> httpbody_pb2.HttpBody:
        async def work() -> httpbody_pb2.HttpBody:
            cores = await rpc.parse(raw, message, convert, rpc.call(context, self.embedder.limits.max_client_batch_size))
            model = await served_model(self.embedder, cores[0])
            dimension = getattr(model, "dimension", None)
            dims = [None] * sum(len(c.inputs) for c in cores)
            for core in cores:
                core.prompt_name = task_prompt(model, core.echo["prompts"])
                for row, d in zip(core.echo["rows"], core.echo["dims"]):
                    if d is not None and dimension is not None and d > dimension:
                        raise errors.invalid_argument(f"output_dimensionality must be at most {dimension} for {model.id}; got {d}.", "output_dimensionality")
                    dims[row] = d
            # One core request per task in the batch (usually one): each is batched by the engine as it comes.
            results = [await self.embedder.embed(core) for core in cores]
            result = merge(results, cores, len(dims))
            await rpc.respond(context, result)
            return await rpc.encode(to_body, result.vectors.size, result.vectors, dims, single)

        return await rpc.handle(context, DIALECT, work)


DIALECT = Dialect(
    name="gemini",
    services=(pb.DESCRIPTOR.services_by_name["Gemini"].full_name,),
    add_to_server=lambda server, embedder, config: add_servicer(server, pb.DESCRIPTOR.services_by_name["Gemini"], GeminiServicer(embedder)),
    auth=(auth.HeaderKey("X-Goog-Api-Key", how="x-goog-api-key: <key> (or ?key=<key>)"), auth.BEARER),
    error_body=error_body,
    http_status=http_status,
    # `/v1/models/` as a prefix would also claim OpenAI's `GET /v1/models/{model}`: only the `:verb` paths (a `^` regex).
    # Body-parse errors are Google's in any case, matched by the service name once the transcoder has rewritten the path.
    rest_prefixes=("/v1beta/", r"^/v1/models/[^?]*:[A-Za-z]+(\?.*)?$"),
    envoy_error_body={"error": {"code": "%RESPONSE_CODE%", "message": "%LOCAL_REPLY_BODY%", "status": "%STATUS_NAME%"}},
    envoy_status_names=STATUS,
    doc={"api": "Google Gemini API embeddings", "routes": "`POST /v1beta/models/{model}:embedContent`, `…:batchEmbedContents`, `GET /v1beta/models[/{model}]` (and under `/v1/`)",
         "client": "`google-genai`", "auth": "`x-goog-api-key` or `?key=` (or `Authorization: Bearer`)",
         "error": '`{"error": {"code": 400, "message": "...", "status": "INVALID_ARGUMENT"}}`'},
)
