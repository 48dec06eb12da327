"""The OpenAPI 3.1 document of every REST route the served APIs have, assembled from one fragment per API
(`<dialect name>.yaml` here: its paths, schemas, error body and auth schemes), served at `GET /openapi.json` with
Swagger UI at `GET /docs` (service/dialects/reference.py).

A fragment says, besides its OpenAPI `paths` and `components`: `tag` and `description` (the API's section),
`security` (its schemes, as lists of scheme names that go together) and `error` (the schema of its error body,
every operation's `default` response). tests/test_openapi.py holds the document to the protos' HTTP bindings (every
route documented, nothing else), validates it, and sends every example to the real service, checking each answer
against its schema.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "A key (`key` or `key:secret`) as a Bearer token."},
    "basic": {"type": "http", "scheme": "basic", "description": "Inworld's: base64 of `key:secret` (the username is the key)."},
    "goog_key": {"type": "apiKey", "in": "header", "name": "x-goog-api-key"},
    "goog_key_query": {"type": "apiKey", "in": "query", "name": "key"},
    "hrflow_key": {"type": "apiKey", "in": "header", "name": "X-API-KEY"},
    "hrflow_email": {"type": "apiKey", "in": "header", "name": "X-USER-EMAIL"},
}
GOOGLE_RPC_STATUS = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "details": {"type": "array", "items": {"type": "object"}}},
}
DESCRIPTION = """One self-hosted text-embedding service that speaks the embedding APIs your code already uses.

Keys: every operation needs one only when the service has keys configured (`EMBED_API_KEYS`, `auth.keys_file`); an
open service answers only its own machine. Each API takes its own scheme (below); errors come in its own shape.
Every API also answers over native gRPC on the same port."""


@lru_cache(maxsize=None)
def fragment(name: str) -> dict[str, Any] | None:
    path = HERE / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def document(served: tuple | list, version: str = "") -> dict[str, Any]:
    """The document for the served dialects (their `name`s pick the fragments; one without a fragment has no REST)."""
    from .. import __version__

    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "embedding-service", "version": version or __version__, "description": DESCRIPTION,
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "servers": [{"url": "/"}],
        "tags": [],
        "paths": {},
        "components": {"securitySchemes": copy.deepcopy(SECURITY_SCHEMES), "schemas": {"google_rpc_status": GOOGLE_RPC_STATUS}},
    }
    for dialect in served:
        frag = fragment(dialect.name)
        if frag is None:
            continue
        frag = copy.deepcopy(frag)
        doc["tags"].append({"name": frag["tag"], "description": frag["description"]})
        security = [{name: [] for name in together} for together in frag["security"]]
        error = {"description": f"An error, in {frag['tag']}'s shape and status.",
                 "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{frag['error']}"}}}}
        for path, operations in frag["paths"].items():
            for method, op in operations.items():
                op.setdefault("tags", [frag["tag"]])
                op.setdefault("security", security)
                op["responses"].setdefault("default", error)
                if method in doc["paths"].setdefault(path, {}):
                    raise ValueError(f"{method.upper()} {path} is documented twice ({dialect.name})")
                doc["paths"][path][method] = op
        for kind, items in frag.get("components", {}).items():
            for name, item in items.items():
                if name in doc["components"].setdefault(kind, {}):
                    raise ValueError(f"components.{kind}.{name} is defined twice ({dialect.name})")
                doc["components"][kind][name] = item
    return doc
