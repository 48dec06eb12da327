"""A self-hosted text-embedding service that speaks every major embedding API dialect."""

__version__ = "0.1.0"
