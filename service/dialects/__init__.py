"""Dialects: thin adapters between one API's wire format and the core `EmbedRequest`/`EmbedResult`.

A dialect never touches a runtime, a batcher or a cache: it maps fields, calls `Embedder.embed`, and
maps the result back. Errors are raised as `ServiceError`s and rendered by `service.errors`.
"""
