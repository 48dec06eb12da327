"""The API reference: `GET /openapi.json` (the OpenAPI 3.1 document of every REST route this configuration serves,
service/openapi/) and Swagger UI at `GET /docs`, its assets from the PyPI package swagger-ui-py, served from here.

Not an API of its own, but registered as one (a proto, this module, its `DIALECT`) so that Envoy routes it, the
server serves it and the auth interceptor lets anyone read it, as TEI's `/docs` is open. `dialects.disabled:
[reference]` turns it off.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import orjson
from google.api import httpbody_pb2

from embedding.dialects.v1 import reference_pb2 as pb

from .. import errors, openapi, rpc
from . import Dialect, enabled
from .common import add_servicer, as_message, constant

SERVICE = pb.DESCRIPTOR.services_by_name["ApiReference"]
# The only files served under /docs/: Swagger UI's, by name (nothing else of the package, no path is joined).
ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "application/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
PAGE = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>embedding-service: API reference</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true, displayRequestDuration: true});
  </script>
</body>
</html>
"""


def static_dir() -> Path:
    import swagger_ui

    return Path(swagger_ui.__file__).parent / "static"


# The page runs Swagger UI's script and its one inline call, from here only; nothing may frame it.
HEADERS = (("x-content-type-options", "nosniff"),
           ("content-security-policy", "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                                       "img-src 'self' data:; frame-ancestors 'none'"))


class ReferenceServicer:
    def __init__(self, document: dict) -> None:
        self.document = httpbody_pb2.HttpBody(content_type="application/json", data=orjson.dumps(document))
        self.page = httpbody_pb2.HttpBody(content_type="text/html; charset=utf-8", data=PAGE)
        self.assets: dict[str, httpbody_pb2.HttpBody] = {}

    async def OpenApi(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        return await rpc.handle(context, DIALECT, constant(self.document))

    async def Page(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            await context.send_initial_metadata(HEADERS)
            return self.page

        return await rpc.handle(context, DIALECT, work)

    async def Asset(self, raw: bytes, context: grpc.aio.ServicerContext) -> httpbody_pb2.HttpBody:  # noqa: N802
        async def work() -> httpbody_pb2.HttpBody:
            request = await rpc.parse(raw, pb.ReferenceAssetRequest, as_message, rpc.Call())
            kind = ASSETS.get(request.file)
            if kind is None:
                raise errors.ServiceError(grpc.StatusCode.NOT_FOUND, f"No such file: {request.file[:80]!r}.", reason="NOT_FOUND")
            if request.file not in self.assets:  # read once, on first use (1.5 MB of script)
                self.assets[request.file] = httpbody_pb2.HttpBody(content_type=kind, data=(static_dir() / request.file).read_bytes())
            await context.send_initial_metadata(HEADERS[:1])
            return self.assets[request.file]

        return await rpc.handle(context, DIALECT, work)



def _add(server: grpc.aio.Server, embedder, config) -> None:
    add_servicer(server, SERVICE, ReferenceServicer(openapi.document(enabled(config))))


DIALECT = Dialect(
    name="reference",
    services=(SERVICE.full_name,),
    add_to_server=_add,
    auth=(),
    public_methods=tuple(f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods),
    doc={"api": "API reference", "routes": "`GET /openapi.json`, `GET /docs`"},
)
