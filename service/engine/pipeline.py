"""The one embedding pipeline every dialect calls: validate, tokenize, batch, infer, pool, normalize.

A dialect turns its wire format into an `EmbedRequest` and an `EmbedResult` back into its wire format;
everything between (limits, model lookup, tokenization, the cache, batching, normalization,
Matryoshka truncation) happens here, once, for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import numpy as np

from .. import errors
from ..config import LimitsConfig
from .batcher import Job
from .cache import EmbeddingCache
from .models import ModelRegistry, RemoteModel, ServedModel
from .pooling import l2_normalize
from . import long_inputs
from .tokenizer import Tokens

# The name of the credential the current request was authenticated with ('' for an open service), set by the
# auth interceptor: the cache keeps each caller's entries apart (`cache.per_credential`).
caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")


@dataclass
class EmbedRequest:
    """What a caller asks for, in the core's terms."""

    # Texts, or token ids of the model's own tokenizer (used as given), one int array (or list) per input.
    inputs: list[str] | list[np.ndarray] | list[list[int]]
    # An id or alias; '' is the default model.
    model: str = ""
    # Cut an over-long input (from `truncation_direction`) instead of refusing it (the older switch; see long_inputs).
    truncate: bool = True
    truncation_direction: str = "right"
    # What happens to an input longer than the model reads: refuse | truncate | chunk (see engine/long_inputs.py).
    # None: `truncate` decides (True: truncate, False: refuse).
    long_inputs: str | None = None
    # None: as the model was trained (normalized when its folder ends in Normalize).
    normalize: bool | None = None
    # A key of the model's `prompts`; None means the model's default prompt, if it has one.
    prompt_name: str | None = None
    # Keep the first N components and L2-renormalize (Matryoshka).
    dimensions: int | None = None
    # Read at most this many tokens of an input (special tokens included), where an API lets its caller say (Ollama's
    # num_ctx, Cohere's max_tokens): below the model's own limit, an input past it is cut or refused by the policy (a
    # policy of `chunk` reads the model's windows); at or above it, the model's limit.
    max_tokens: int | None = None
    # Also return the per-token embeddings (HrFlow's return_sequences).
    token_embeddings: bool = False
    use_cache: bool = True
    # While the model loads: wait for it, or answer UNAVAILABLE with an estimate.
    wait_for_model: bool = True
    # time.monotonic() after which nobody waits for the answer.
    deadline: float | None = None
    # The dialect's name for the inputs field, used in error messages.
    param: str = "input"
    # Forward to this configured provider (Inworld's SERVICE_PROVIDER_OPENAI) with `model` as its model id.
    provider: str | None = None
    # What the dialect needs back to write its answer (e.g. the model name as the caller spelled it); never read here.
    echo: dict = field(default_factory=dict)


@dataclass
class Timings:
    tokenize: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    total: float = 0.0


@dataclass
class EmbedResult:
    model: str  # canonical id
    vectors: np.ndarray  # [N, D] float32, in input order
    token_counts: list[int]
    token_embeddings: list[np.ndarray] | None = None
    cache_hits: int = 0
    timings: Timings = field(default_factory=Timings)
    # Usage reported by an upstream provider (per-input counts are then unknown, and 0).
    usage_tokens: int | None = None
    # Inputs that were cut to what the model reads, and inputs embedded as several windows.
    truncated: int = 0
    chunked: int = 0

    @property
    def total_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else sum(self.token_counts)


class Embedder:
    def __init__(
        self, registry: ModelRegistry, limits: LimitsConfig, cache: EmbeddingCache, executor: Executor, per_credential_cache: bool = True
    ) -> None:
        self.registry = registry
        self.per_credential_cache = per_credential_cache
        self.limits = limits
        self.cache = cache
        self.executor = executor
        self.inflight = 0

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        started = time.perf_counter()
        if req.deadline is None:
            req.deadline = time.monotonic() + self.limits.request_timeout_seconds
        self._validate(req)
        model = None
        if not req.provider:
            # Before taking a place: a caller waiting for its model to load is not worked on, and a flood of callers
            # naming a model still loading would otherwise take every place from the models already serving.
            model = await self.registry.get(req.model, wait=req.wait_for_model, timeout=max(0.0, req.deadline - time.monotonic()))
        with self.admitted():
            if model is None:
                return await self._forward(req, *self._provider_route(req), started)
            if isinstance(model, RemoteModel):
                return await self._forward(req, model.provider, model.upstream_model, started, label=model.id)
            return await self._embed(req, model, started)

    @contextlib.contextmanager
    def admitted(self):
        """One of `limits.max_concurrent_requests` places, held while the request is worked on; none left: 429 at once.
        Every request that makes the server work holds one (embedding, and the Tokenize and Decode APIs, which share
        the tokenizer pool with large embedding requests)."""
        if self.inflight >= self.limits.max_concurrent_requests:
            raise errors.overloaded(f"The server is at its limit of {self.limits.max_concurrent_requests} concurrent requests; retry shortly.", 1.0)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def _embed(self, req: EmbedRequest, model: ServedModel, started: float) -> EmbedResult:
        self._validate_options(req, model)
        self._refuse_sure_failures(model, req)
        # Refuse a flood before paying to tokenize it (an estimate; the exact count is checked again below).
        self._admit(model, self._estimate_tokens(model, req))

        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        tokens = await self._tokenize(model, req)
        tokenize_seconds = time.perf_counter() - t0

        n = len(tokens.groups)
        pooled = np.empty((n, model.dimension), dtype=np.float32)
        keys: list[tuple] | None = None
        missing = list(range(n))
        hits = 0
        use_cache = req.use_cache and self.cache.enabled and not req.token_embeddings
        if use_cache:
            plen = tokens.items[0].prompt_length
            keys = [EmbeddingCache.key(self._cache_space(model.id), key, plen) for key in tokens.keys]
            missing = []
            for i, key in enumerate(keys):
                vec = self.cache.get(key)
                if vec is None:
                    missing.append(i)
                else:
                    pooled[i] = vec
            hits = n - len(missing)

        job = None
        token_embeddings = None
        if missing:
            rows = [j for i in missing for j in tokens.groups[i]]
            self._admit(model, sum(len(tokens.items[j]) for j in rows))
            job = Job([tokens.items[j] for j in rows], req.token_embeddings, loop, req.deadline)
            model.batcher.submit(job)
            try:
                await job.future
            except asyncio.CancelledError:
                job.cancelled = True  # its inputs still queued are dropped before they are computed
                raise
            # Back from the job's rows to the inputs': an input's windows become one vector.
            by_item = np.empty((len(tokens.items), model.dimension), dtype=np.float32)
            by_item[rows] = job.pooled
            combined = tokens.combine(by_item, missing)
            pooled[missing] = combined
            if keys is not None:
                for row, i in enumerate(missing):
                    self.cache.put(keys[i], combined[row].copy())
            token_embeddings = job.token_embeddings

        vectors = self._finish(pooled, req, model)
        timings = Timings(tokenize=tokenize_seconds, total=time.perf_counter() - started)
        if job is not None and job.started_at is not None:
            timings.queue = job.started_at - job.enqueued_at
            timings.inference = job.inference_seconds
        return EmbedResult(
            model=model.id,
            vectors=vectors,
            token_counts=[tokens.tokens_read(i) for i in range(n)],
            token_embeddings=token_embeddings,
            cache_hits=hits,
            timings=timings,
            truncated=tokens.truncated,
            chunked=tokens.chunked,
        )

    def _provider_route(self, req: EmbedRequest) -> tuple[object, str]:
        """The provider a request names (Inworld's SERVICE_PROVIDER_OPENAI) and the model id to ask it for."""
        provider = self.registry.provider(req.provider or "")
        if provider is None:
            raise errors.ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"SERVICE_PROVIDER_{(req.provider or '').upper()} was asked for, but no "
                f"{'OpenAI' if req.provider == 'openai' else req.provider} provider is configured on this server.",
                reason="PROVIDER_NOT_CONFIGURED",
                param="model.service_provider",
            )
        upstream = req.model
        with contextlib.suppress(errors.ServiceError):  # a configured model of that provider: its upstream id
            cfg = self.registry.config(req.model)
            if cfg.provider == req.provider:
                upstream = cfg.upstream_model or cfg.id
        if not upstream:
            raise errors.invalid_argument("Name the provider's model: model.model is empty.", "model.model")
        return provider, upstream

    async def _forward(self, req: EmbedRequest, provider, upstream: str, started: float, label: str | None = None) -> EmbedResult:
        """A model another API serves: its vectors, then our own normalize / dimensions / cache."""
        if req.token_embeddings:
            raise errors.invalid_argument("Token embeddings (return_sequences) are not available for a model served by a provider.", req.param)
        if req.prompt_name is not None:
            raise errors.invalid_argument(f"Unknown prompt_name {req.prompt_name!r}: a model served by a provider has no prompts.", "prompt_name")
        name = label or upstream
        cache_model = self._cache_space(f"{provider.name}/{upstream}")
        keys = [(cache_model, 0, x.encode() if isinstance(x, str) else np.asarray(x, dtype=np.int64).tobytes()) for x in req.inputs]
        use_cache = req.use_cache and self.cache.enabled
        found = {i: v for i, k in enumerate(keys) if use_cache and (v := self.cache.get(k)) is not None}
        missing = [i for i in range(len(keys)) if i not in found]
        tokens = 0
        t0 = time.perf_counter()
        rows: dict[int, np.ndarray] = dict(found)
        if missing:
            items = [x if isinstance(x, str) else np.asarray(x).tolist() for x in (req.inputs[i] for i in missing)]
            answer = await provider.embed(items, upstream, req.deadline)
            tokens = answer.tokens
            for row, i in enumerate(missing):
                rows[i] = answer.vectors[row]
                if use_cache:
                    self.cache.put(keys[i], answer.vectors[row].copy())
        vectors = np.stack([rows[i] for i in range(len(keys))]).astype(np.float32)
        dim = vectors.shape[1]
        if req.dimensions is not None and not 1 <= req.dimensions <= dim:
            raise errors.invalid_argument(f"dimensions must be between 1 and {dim} for {name}; got {req.dimensions}.", "dimensions")
        if req.dimensions is not None and req.dimensions < dim:
            vectors = vectors[:, : req.dimensions]
            if req.normalize is not False:
                vectors = l2_normalize(vectors)
        elif req.normalize:
            vectors = l2_normalize(vectors)
        elapsed = time.perf_counter() - t0
        return EmbedResult(
            model=name,
            vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            token_counts=[0] * len(keys),
            cache_hits=len(found),
            timings=Timings(inference=elapsed, total=time.perf_counter() - started),
            usage_tokens=tokens,
        )

    # -- steps ------------------------------------------------------------------------------------

    def _cache_space(self, model: str) -> str:
        """The cache's namespace: the model, and with keys configured the caller's credential, so that no caller can
        learn (from `x-cache` or from timing) what another one embedded."""
        who = caller.get() if self.per_credential_cache else ""
        return f"{model}\0{who}" if who else model

    def _refuse_sure_failures(self, model: ServedModel, req: EmbedRequest) -> None:
        """A request the caps are sure to refuse gets its 400 before admission, from a cheap bound (words, list
        lengths): the same answer at any load, never a 429 that invites a retry of something that can't succeed."""
        policy, limits, limit = self.policy(req), self.limits, model.tokenizer.max_seq_length
        if not isinstance(req.inputs[0], str):
            long_inputs.check_ids(req.inputs, policy, limit, limits.max_input_tokens, limits.max_windows_per_request, req.param)
        elif policy == "chunk":
            long_inputs.check_words(req.inputs, limit, limits.max_input_tokens, limits.max_windows_per_request, req.param)  # type: ignore[arg-type]

    def _admit(self, model: ServedModel, new_tokens: int) -> None:
        """Backpressure: refuse at once, rather than queue work the server can't start soon."""
        queued = model.batcher.queued_tokens
        if queued and queued + new_tokens > self.limits.max_queued_tokens:
            rate = model.batcher.tokens_per_second or 5000.0
            raise errors.overloaded(
                f"The queue of {model.id} is full ({queued} tokens waiting); retry shortly.", (queued + new_tokens) / rate
            )

    def _validate(self, req: EmbedRequest) -> None:
        if not req.inputs:
            raise errors.invalid_argument("At least one input is required; got none.", req.param, "EMPTY_INPUT")
        if len(req.inputs) > self.limits.max_client_batch_size:
            raise errors.invalid_argument(
                f"Too many inputs: {len(req.inputs)}; at most {self.limits.max_client_batch_size} per request.",
                req.param,
                "TOO_MANY_INPUTS",
            )
        texts = isinstance(req.inputs[0], str)
        for i, item in enumerate(req.inputs):
            if isinstance(item, str) != texts:
                raise errors.invalid_argument(f"Input {i} is not a {'string' if texts else 'list of token ids'} like input 0.", req.param)
            if texts and not item:
                raise errors.invalid_argument(f"Input {i} is an empty string; every input must have text.", req.param, "EMPTY_INPUT")
            # Every limit applies on every path, truncating or not: a huge input never reaches a tokenizer thread.
            if len(item) > self.limits.max_input_chars:
                raise errors.invalid_argument(
                    f"Input {i} has {len(item)} {'characters' if texts else 'tokens'}; at most {self.limits.max_input_chars} are accepted.",
                    req.param,
                    "INPUT_TOO_LONG",
                )
        if req.long_inputs is not None and req.long_inputs not in long_inputs.POLICIES:
            raise errors.invalid_argument(f"Unknown long-input policy {req.long_inputs!r}.", req.param)
        if req.truncation_direction not in ("right", "left"):
            raise errors.invalid_argument("truncation_direction must be Left or Right.", "truncation_direction")

    def _validate_options(self, req: EmbedRequest, model: ServedModel) -> None:
        if req.dimensions is not None and not 1 <= req.dimensions <= model.dimension:
            raise errors.invalid_argument(
                f"dimensions must be between 1 and {model.dimension} for {model.id}; got {req.dimensions}.", "dimensions"
            )
        if req.prompt_name is not None and req.prompt_name not in model.prompts:
            known = ", ".join(sorted(model.prompts)) or "none"
            raise errors.invalid_argument(
                f"Unknown prompt_name {req.prompt_name!r} for {model.id}; its prompts are: {known}.", "prompt_name"
            )

    # Inputs tokenized per call in the tokenizer thread: between chunks it checks whether anyone still waits.
    TOKENIZE_CHUNK = 32
    # A request this small is tokenized on the event loop (bounded: ~50 µs), not on the tokenizer pool.
    INLINE_CHARS, INLINE_INPUTS = 2048, 8

    def _small(self, req: EmbedRequest) -> bool:
        if len(req.inputs) > self.INLINE_INPUTS:
            return False
        return sum(len(x) for x in req.inputs) <= self.INLINE_CHARS

    def _estimate_tokens(self, model: ServedModel, req: EmbedRequest) -> int:
        """Tokens a request will queue, before tokenizing it: ~4 characters a token, capped at what the model reads."""
        cap = model.tokenizer.max_seq_length
        if isinstance(req.inputs[0], str):
            return sum(min(cap, len(t) // 4 + 2) for t in req.inputs)  # type: ignore[arg-type]
        return sum(min(cap, len(t)) for t in req.inputs)

    @staticmethod
    def policy(req: EmbedRequest) -> str:
        if req.long_inputs is not None:
            return req.long_inputs
        return "truncate" if req.truncate else "refuse"

    async def _tokenize(self, model: ServedModel, req: EmbedRequest) -> long_inputs.Tokenized:
        """The request's inputs as batcher items. A small request is tokenized here, on the event loop (tens of
        microseconds: less than a hop to a thread); a large one in chunks of `TOKENIZE_CHUNK` inputs, each its own task
        on the tokenizer pool, so that other requests' chunks take turns with it, and a caller that went away or a
        deadline that passed stops it between chunks."""
        policy = self.policy(req)
        limits = self.limits
        if not isinstance(req.inputs[0], str):
            return long_inputs.from_ids(model.tokenizer, req.inputs, policy, req.truncation_direction, req.param,  # type: ignore[arg-type]
                                        limits.max_input_tokens, limits.max_windows_per_request, limits.chunk_overlap_tokens)
        texts: list[str] = req.inputs  # type: ignore[assignment]
        name = req.prompt_name if req.prompt_name is not None else model.default_prompt_name
        prompt = model.prompts.get(name, "") if name else ""
        prompt_tokens = 0
        if prompt:
            texts = [prompt + t for t in texts]
            enc = model.tokenizer.encode_detailed([prompt])[0]
            lead, trail = long_inputs._specials(enc.special_tokens_mask)
            prompt_tokens = len(enc.ids) - lead - trail
        out = long_inputs.Tokenized()

        def chunk(start: int, quick: bool = False) -> None:
            long_inputs.tokenize(model.tokenizer, texts[start : start + self.TOKENIZE_CHUNK], policy, req.truncation_direction, req.param,
                                 prompt_tokens, limits.max_input_tokens, limits.max_windows_per_request, limits.chunk_overlap_tokens,
                                 offset=start, tokenized=out, quick=quick)

        if self._small(req):
            chunk(0, quick=True)
        else:
            loop = asyncio.get_running_loop()
            for start in range(0, len(texts), self.TOKENIZE_CHUNK):
                if req.deadline is not None and time.monotonic() > req.deadline:
                    raise errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request's deadline passed while it was tokenized.",
                                              reason="DEADLINE_EXCEEDED")
                # The library here, not the pure-Python path: that one holds the GIL. Measured, runs interleaved: it
                # took bulk streaming +4 % and REST 32 x 32 +4.5 %, but a short text's p90 amid 4 x 32 clients went
                # 116-117 -> 125-131 ms (a switch interval of 1 ms did not win it back).
                await loop.run_in_executor(self.executor, chunk, start)
        if req.max_tokens is not None and req.max_tokens < model.tokenizer.max_seq_length and policy != "chunk":
            text = isinstance(req.inputs[0], str)  # token ids come as given: no special tokens or prompt added
            long_inputs.cap(out, req.max_tokens, model.tokenizer.specials if text else (0, 0), prompt_tokens if text else 0, policy,
                            req.truncation_direction, req.param, out.cut)
        if req.token_embeddings:
            values = sum(len(t) for t in out.items) * model.runtime.hidden_size
            if values > limits.max_output_values:
                raise errors.invalid_argument(
                    f"Token embeddings of {sum(len(t) for t in out.items)} tokens would be {values} numbers; at most "
                    f"{limits.max_output_values} are returned (limits.max_output_values): send fewer or shorter inputs.",
                    req.param, "RESPONSE_TOO_LARGE",
                )
        if req.token_embeddings and out.chunked:
            raise errors.invalid_argument(
                "Token embeddings can't be returned for an input embedded in several windows: ask for truncation, or send "
                "inputs within the model's limit.", req.param, "CHUNKING_WITH_TOKEN_EMBEDDINGS",
            )
        if prompt and not model.include_prompt:
            plen = model.tokenizer.prompt_length(prompt)
            out.items = [Tokens(t.ids, t.type_ids, plen) for t in out.items]
        return out

    @staticmethod
    def _finish(pooled: np.ndarray, req: EmbedRequest, model: ServedModel) -> np.ndarray:
        vectors = pooled
        normalize = model.normalizes if req.normalize is None else req.normalize
        if req.dimensions is not None and req.dimensions < model.dimension:
            vectors = vectors[:, : req.dimensions]
            normalize = req.normalize is not False
        if normalize:
            vectors = l2_normalize(vectors)
        return np.ascontiguousarray(vectors, dtype=np.float32)
