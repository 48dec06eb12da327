"""Forwarding to an OpenAI-compatible embeddings API (OpenAI itself, or another instance of this service).

- One pooled HTTP/2-capable client per provider (httpx), never a connection per request.
- A large request is split into upstream batches of `max_batch` inputs, at most `max_concurrency` in
  flight per provider, and merged back in order.
- 429 and 5xx (and dropped connections) are retried with exponential backoff, honouring `Retry-After`,
  never past the caller's deadline; nothing else is (an upstream 4xx will not change its mind). These are the
  request's only retries of the upstream: the failures we answer are not marked for Envoy to retry, so one
  request costs at most 1 + `max_retries` upstream calls per upstream batch.
- Upstream failures become ours, worded for our caller: an upstream 401 is our UNAVAILABLE ("the
  upstream rejected this server's credentials"), never the caller's 401. The upstream key is sent only
  in the Authorization header to the upstream: it never reaches a log line or a response.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import random
import time
from dataclasses import dataclass

import grpc
import httpx
import numpy as np

from .. import errors
from ..config import ProviderConfig

log = logging.getLogger(__name__)


@dataclass
class Forwarded:
    vectors: np.ndarray  # [N, D] float32, as the upstream sent them
    tokens: int


class OpenAIProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.name = config.name
        self._key = os.environ.get(config.api_key_env, "") if config.api_key_env else config.api_key
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(config.timeout_seconds, connect=min(5.0, config.timeout_seconds)),
            limits=httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency),
        )
        self._slots = asyncio.Semaphore(config.max_concurrency)

    async def close(self) -> None:
        await self._client.aclose()

    async def embed(self, inputs: list[str] | list[list[int]], model: str, deadline: float | None) -> Forwarded:
        """The upstream's vectors for `inputs`, in upstream batches; the first batch that fails cancels the others
        (their answers would be thrown away: no upstream call is spent on a request that has already failed)."""
        size = self.config.max_batch
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._batch(inputs[i : i + size], model, deadline)) for i in range(0, len(inputs), size)]
        except* errors.ServiceError as failed:
            raise failed.exceptions[0] from None
        parts = [t.result() for t in tasks]
        return Forwarded(np.concatenate([p.vectors for p in parts]), sum(p.tokens for p in parts))

    async def _batch(self, inputs: list, model: str, deadline: float | None) -> Forwarded:
        body = {"input": inputs, "model": model, "encoding_format": "base64"}
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _deadline(self.name)
            try:
                async with self._slots:
                    response = await self._client.post("embeddings", json=body, timeout=min(self.config.timeout_seconds, remaining or math.inf))
            except httpx.TimeoutException:
                if deadline is not None and time.monotonic() >= deadline - 0.01:
                    raise _deadline(self.name) from None
                failure, wait = self._unavailable("did not answer in time"), None
            except httpx.TransportError as e:
                failure, wait = self._unavailable(f"could not be reached ({type(e).__name__})"), None
            else:
                if response.status_code == 200:
                    return self._parse(response, len(inputs))
                failure, wait = self._failure(response), _retry_after(response)
                if response.status_code not in (429, 500, 502, 503, 504):
                    raise failure
            attempt += 1
            if attempt > self.config.max_retries:
                raise failure
            delay = wait if wait is not None else min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.75 + random.random() / 2)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise failure if failure.code != grpc.StatusCode.UNAVAILABLE else _deadline(self.name)
            log.debug("retrying upstream", extra={"provider": self.name, "attempt": attempt, "delay": round(delay, 2)})
            await asyncio.sleep(delay)

    def _parse(self, response: httpx.Response, expected: int) -> Forwarded:
        try:
            payload = response.json()
            data = sorted(payload["data"], key=lambda d: d["index"])
            rows = [
                np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if isinstance(d["embedding"], str) else np.asarray(d["embedding"], dtype=np.float32)
                for d in data
            ]
            vectors = np.stack(rows).astype(np.float32)
            tokens = int((payload.get("usage") or {}).get("prompt_tokens", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise self._unavailable(f"sent an answer this server could not read ({type(e).__name__})") from None
        if len(vectors) != expected:
            raise self._unavailable(f"answered {len(vectors)} embeddings for {expected} inputs")
        return Forwarded(vectors, tokens)

    def _failure(self, response: httpx.Response) -> errors.ServiceError:
        status = response.status_code
        try:
            detail = response.json().get("error", {})
            message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
        except ValueError:
            message = ""
        message = message[:300]
        if status in (401, 403):
            return self._unavailable(f"rejected this server's credentials (HTTP {status}); the operator must fix the provider's API key")
        if status == 429:
            return errors.ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"The upstream provider '{self.name}' is rate limiting; retry later.",
                reason="UPSTREAM_RATE_LIMITED", retry_after=_retry_after(response) or 1.0,
            )
        if status == 404:
            return errors.ServiceError(grpc.StatusCode.NOT_FOUND, f"The upstream provider '{self.name}' does not know this model: {message}", reason="model_not_found", param="model")
        if 400 <= status < 500:
            return errors.invalid_argument(f"The upstream provider '{self.name}' refused the request: {message}", "input", "UPSTREAM_INVALID_ARGUMENT")
        return self._unavailable(f"failed (HTTP {status})")

    def _unavailable(self, what: str) -> errors.ServiceError:
        return errors.ServiceError(grpc.StatusCode.UNAVAILABLE, f"The upstream provider '{self.name}' {what}.", reason="UPSTREAM_UNAVAILABLE")


def _deadline(name: str) -> errors.ServiceError:
    return errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"The upstream provider '{name}' did not answer before the deadline.", reason="DEADLINE_EXCEEDED")


def _retry_after(response: httpx.Response) -> float | None:
    ms = response.headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None
