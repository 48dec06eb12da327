"""Upstream providers: models served by another OpenAI-compatible API instead of a local runtime.

The pipeline asks a provider for raw vectors in place of the batcher; everything after (normalize,
`dimensions`, base64 or big-endian encoding, the cache) stays in our code, so every dialect can reach a
forwarded model and answers in its own shape.
"""
