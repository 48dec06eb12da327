"""Text Embeddings Inference (huggingface/text-embeddings-inference) for an embedding model: its HTTP routes and
its own gRPC API, `tei.v1` (proto/tei/v1/tei.proto, TEI v1.9.3's file as published: code generated from it calls us; its
`optional bool normalize` unset is true and `optional uint32 dimensions` cuts, as TEI 1.9 does). `/info.version` is the
TEI version whose API this matches (1.9.3); `docker_label` names this service and its version.

HTTP (`proto/embedding/dialects/v1/tei.proto`): `POST /embed`, `POST /` and `POST /invocations` (TEI's routes for an
embedding model), `POST /embed_all`, `POST /tokenize` (byte offsets, as TEI), `POST /decode`, `GET /info`,
`GET /health` and `GET /ping`, `POST /similarity`, `POST /vertex`, and `POST /rerank`, `POST /predict`,
`POST /embed_sparse` as TEI refuses them on a dense embedding model (tasks.py); answers and errors as TEI writes them
(`{"error": ..., "error_type": ...}` with TEI 1.9's statuses: Empty 400, Validation (a body of the wrong shape too)
422, Backend 424, Overloaded 429, Unhealthy 503), timing headers in whole milliseconds. TEI's HTTP defaults:
`normalize` true, `truncate` TEI's --auto-truncate (true since 1.9), `add_special_tokens` and `skip_special_tokens` true.

`POST /embeddings` (TEI's second OpenAI path) is OpenAI's dialect's, as `/v1/embeddings` is.

gRPC: `tei.v1.Info`, `tei.v1.Embed` (Embed, EmbedAll and their streams; EmbedSparse answers that the model is
dense) and `tei.v1.Tokenize` (Tokenize, Decode and their streams), with TEI's gRPC semantics: one input per
message, proto3 defaults (normalize, truncate, add_special_tokens false), TEI's status codes, and streams that
answer one response per request, in order (service/streams.py: many requests in flight at once, bounded in work,
bytes, idle time and number per credential).

TEI requests name no model: the default model answers, or the one `dialects.model.tei` names (once the
configuration has it).

Here: `http_api.py` (the HTTP routes), `grpc_api.py` (tei.v1), `_shared.py` (TEI's errors, /info, the servicers'
base); this module registers them.
"""

from __future__ import annotations

from typing import Any

import grpc

from embedding.dialects.v1 import tei_pb2 as pb
from tei.v1 import tei_pb2 as tei

from ... import auth
from ...engine.pipeline import Embedder
from .. import Dialect
from ..common import add_servicer
from ._shared import error_body, http_status
from .grpc_api import TeiEmbedServicer, TeiInfoServicer, TeiTokenizeServicer
from .tasks import TeiTasksServicer

# -- registration -----------------------------------------------------------------------------------------------

HTTP_SERVICE = pb.DESCRIPTOR.services_by_name["TextEmbeddingsInference"]
GRPC_SERVICES = {name: tei.DESCRIPTOR.services_by_name[name] for name in ("Info", "Embed", "Tokenize")}


def configured_model(config: Any) -> str:
    """The model TEI's routes use: `dialects.model.tei` where the configuration has it, else the default model ('')."""
    models = getattr(config.dialects, "model", None) or {}
    return str(models.get("tei", "")) if isinstance(models, dict) else ""


def add_to_server(server: grpc.aio.Server, embedder: Embedder, config: Any) -> None:
    # TEI's --auto-truncate: an over-long input with `truncate` left out is cut (TEI 1.9's default, `dialects.long_inputs.tei`
    # truncate), or refused (`--auto-truncate false`: refuse); `limits.auto_truncate` forces it on.
    auto = config.limits.auto_truncate or config.dialects.long_inputs.get("tei") == "truncate"
    settings = {"model": configured_model(config), "auto_truncate": auto}
    add_servicer(server, HTTP_SERVICE, TeiTasksServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Info"], TeiInfoServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Embed"], TeiEmbedServicer(embedder, **settings))
    add_servicer(server, GRPC_SERVICES["Tokenize"], TeiTokenizeServicer(embedder, **settings))


DIALECT = Dialect(
    name="tei",
    services=(HTTP_SERVICE.full_name, *(s.full_name for s in GRPC_SERVICES.values())),
    add_to_server=add_to_server,
    # TEI's --api-key: `Authorization: Bearer <key>`, over HTTP and gRPC alike.
    auth=(auth.BEARER,),
    error_body=error_body,
    http_status=http_status,
    # TEI's /health needs no key (TEI keeps it out of --api-key's reach, for load balancers' probes).
    public_methods=(f"/{HTTP_SERVICE.full_name}/Health",),
    # `/embed` and `/` as exact paths (regexes, `^`): as prefixes they would also catch other APIs' routes
    # (`/embeddings/v1alpha/...`, every path).
    rest_prefixes=("/embed_all", "/embed_sparse", "/tokenize", "/decode", "/info", "/health", "/ping", "/similarity", "/rerank",
                   "/predict", "/vertex", "/invocations", r"^/embed(\?.*)?$", r"^/(\?.*)?$"),
    envoy_error_body={"error": "%LOCAL_REPLY_BODY%", "error_type": "Validation"},
    doc={"api": "Text Embeddings Inference (HTTP and gRPC `tei.v1`)",
         "routes": "`POST /embed`, `POST /`, `POST /invocations`, `POST /embed_all`, `POST /similarity`, `POST /vertex`, "
                   "`POST /embed_sparse`, `/rerank`, `/predict` (424: dense embedding models), `POST /tokenize`, "
                   "`POST /decode`, `GET /info`, `GET /health`, `GET /ping`; "
                   "gRPC `tei.v1.Info`, `tei.v1.Embed`, `tei.v1.Tokenize`",
         "client": "`huggingface_hub.InferenceClient`, stubs from TEI's `tei.proto`, LangChain `HuggingFaceEndpointEmbeddings`, "
                   "LlamaIndex `TextEmbeddingsInference`",
         "auth": "`Authorization: Bearer`"},
)
