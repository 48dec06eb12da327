"""Served models: reading a sentence-transformers folder, loading it in the background, finding it by name.

A folder is read with sentence-transformers itself, so every format it understands (legacy pooling keys,
prompts, Dense heads) is understood here the same way; from it we keep the tokenizer, the transformer
(handed to a runtime) and the small post-transformer head, which the engine runs in numpy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import errors
from ..config import LimitsConfig, ModelConfig
from ..runtimes.base import Runtime
from .batcher import Batcher, BatchStats
from .pooling import MODES, Dense, pool
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model and its queue: what the pipeline needs to embed with it."""

    config: ModelConfig
    tokenizer: TextTokenizer
    runtime: Runtime
    batcher: Batcher
    dimension: int
    # Whether the folder ends in a Normalize module: the default for callers that don't say.
    normalizes: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    include_prompt: bool
    load_seconds: float

    @property
    def id(self) -> str:
        return self.config.id


def load_model(
    config: ModelConfig, limits: LimitsConfig, on_batch: Callable[[str, BatchStats], None] | None = None
) -> ServedModel:
    """Loads one model folder (blocking; call it off the event loop)."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = config.resolved_path()
    log.info("loading model", extra={"model": config.id, "path": path, "stage": "read folder"})
    st = SentenceTransformer(path, device="cpu", local_files_only=True)
    modules = list(st)
    transformer, rest = modules[0], modules[1:]
    if not hasattr(transformer, "auto_model"):
        raise ValueError(f"{config.id}: the first module must be a Transformer, not {type(transformer).__name__}")

    modes: tuple[str, ...] = ("mean",)
    include_prompt = True
    dense: list[Dense] = []
    normalizes = False
    for m in rest:
        kind = type(m).__name__
        if kind == "Pooling":
            modes = (m.pooling_mode,) if isinstance(m.pooling_mode, str) else tuple(m.pooling_mode)
            unknown = [x for x in modes if x not in MODES]
            if unknown:
                raise ValueError(f"{config.id}: pooling mode {unknown} is not supported")
            include_prompt = bool(getattr(m, "include_prompt", True))
        elif kind == "Dense":
            act = type(m.activation_function).__name__.lower()
            if act not in ("identity", "tanh"):
                raise ValueError(f"{config.id}: Dense activation {act} is not supported")
            bias = m.linear.bias.detach().float().numpy() if m.linear.bias is not None else None
            dense.append(Dense(m.linear.weight.detach().float().numpy(), bias, act))
        elif kind == "Normalize":
            normalizes = True
        else:
            raise ValueError(f"{config.id}: the module {kind} is not supported by this server")

    max_seq = config.max_seq_length or int(st.max_seq_length)
    hf_tokenizer = st.tokenizer
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{config.id}: needs a fast (tokenizers) tokenizer")
    auto_model = transformer.auto_model
    tokenizer = TextTokenizer(backend, max_seq, int(auto_model.config.vocab_size))

    runtime = make_runtime(config, auto_model, path)
    dimension = dense[-1].weight.shape[0] if dense else runtime.hidden_size * len(modes)

    def head(token_embeddings: np.ndarray, mask: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
        pooled = pool(token_embeddings, mask, modes, None if include_prompt else prompt_lengths)
        for layer in dense:
            pooled = layer(pooled).astype(np.float32, copy=False)
        return pooled

    batcher = Batcher(
        config.id,
        runtime,
        head,
        dimension,
        tokenizer.pad_id,
        limits.max_batch_tokens,
        limits.max_batch_size,
        on_batch=(lambda stats: on_batch(config.id, stats)) if on_batch else None,
    )
    prompts = {**(st.prompts or {}), **config.prompts}
    served = ServedModel(
        config=config,
        tokenizer=tokenizer,
        runtime=runtime,
        batcher=batcher,
        dimension=int(dimension),
        normalizes=normalizes,
        prompts=prompts,
        default_prompt_name=getattr(st, "default_prompt_name", None),
        include_prompt=include_prompt,
        load_seconds=0.0,
    )
    # One forward pass so the first caller does not pay for lazy initialisation.
    ids = np.array([tokenizer.encode(["warm up"], truncate=True)[0].ids])
    runtime.forward(ids, np.ones_like(ids), np.zeros_like(ids))
    served.load_seconds = time.perf_counter() - started
    log.info(
        "model ready",
        extra={"model": config.id, "runtime": runtime.describe(), "dimension": served.dimension,
               "max_seq_length": max_seq, "seconds": round(served.load_seconds, 2)},
    )
    return served


def make_runtime(config: ModelConfig, auto_model, path: str) -> Runtime:
    """Picks the runtime and precision for a model (fp32 torch until faster ones are proven here)."""
    runtime = "torch" if config.runtime == "auto" else config.runtime
    precision = "fp32" if config.precision == "auto" else config.precision
    if runtime == "torch":
        from ..runtimes.pytorch import TorchRuntime

        return TorchRuntime(auto_model, precision)
    raise ValueError(f"{config.id}: runtime {runtime} is not available")


@dataclass
class _Slot:
    config: ModelConfig
    state: str = "pending"  # pending | loading | ready | failed
    model: ServedModel | None = None
    error: str = ""
    started_at: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)


class ModelRegistry:
    """Finds models by id or alias and loads them in the background, in configuration order."""

    # What a first load of a small model takes here; replaced by measured load times.
    DEFAULT_LOAD_ESTIMATE = 15.0

    def __init__(
        self,
        configs: list[ModelConfig],
        limits: LimitsConfig,
        on_ready: Callable[[ServedModel], None] | None = None,
        on_batch: Callable[[str, BatchStats], None] | None = None,
    ) -> None:
        self.limits = limits
        self._slots = {c.id: _Slot(c) for c in configs}
        self._names: dict[str, str] = {}
        for c in configs:
            self._names[c.id] = c.id
            for a in c.aliases:
                self._names[a] = c.id
        self.default_id = next(c.id for c in configs if c.default)
        self._on_ready = on_ready
        self._on_batch = on_batch
        self._estimate = self.DEFAULT_LOAD_ESTIMATE
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lookup ---------------------------------------------------------------------------------

    @property
    def configs(self) -> list[ModelConfig]:
        return [s.config for s in self._slots.values()]

    def names(self) -> list[str]:
        return list(self._names)

    def resolve(self, name: str) -> str:
        """The canonical id for a name ('' is the default model); NOT_FOUND lists what exists."""
        if not name:
            return self.default_id
        try:
            return self._names[name]
        except KeyError:
            raise errors.model_not_found(name, self.names()) from None

    def state(self, model_id: str) -> str:
        return self._slots[model_id].state

    def loaded(self) -> list[ServedModel]:
        return [s.model for s in self._slots.values() if s.model is not None]

    async def get(self, name: str, wait: bool = True, timeout: float | None = None) -> ServedModel:
        """The model for `name`; while it loads, waits (bounded by `timeout`) or answers UNAVAILABLE."""
        slot = self._slots[self.resolve(name)]
        if slot.model is not None:
            return slot.model
        if slot.state == "pending" and slot.config.load == "lazy":
            self._load_in_background(slot)
        if slot.state == "failed":
            raise errors.ServiceError(
                errors.grpc.StatusCode.UNAVAILABLE, f"Model {slot.config.id} failed to load: {slot.error}", reason="MODEL_FAILED"
            )
        if not wait:
            raise errors.model_loading(slot.config.id, self._remaining(slot))
        # Polling keeps the wait cancellable (a caller that goes away stops waiting) and costs nothing here.
        end = None if timeout is None else time.monotonic() + timeout
        while not slot.ready.is_set():
            if end is not None and time.monotonic() >= end:
                raise errors.model_loading(slot.config.id, self._remaining(slot))
            await asyncio.sleep(0.05)
        if slot.model is None:  # loading failed
            return await self.get(name, wait=False)
        return slot.model

    def _remaining(self, slot: _Slot) -> float:
        ahead = sum(1 for s in self._slots.values() if s.state == "pending" and s is not slot)
        elapsed = time.monotonic() - slot.started_at if slot.state == "loading" else 0.0
        return max(0.5, self._estimate - elapsed) + (ahead * self._estimate if slot.state == "pending" else 0.0)

    # -- loading --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts loading the `startup` models in a background thread; health reports each as it becomes ready."""
        self._thread = threading.Thread(target=self._load_startup, name="model-loader", daemon=True)
        self._thread.start()

    def load_now(self) -> None:
        """Loads every `startup` model in the calling thread (tests, benchmarks, tools)."""
        self._load_startup()

    def _load_startup(self) -> None:
        for slot in self._slots.values():
            if slot.config.load == "startup":
                self._load(slot)

    def _load_in_background(self, slot: _Slot) -> None:
        with self._lock:
            if slot.state != "pending":
                return
            slot.state, slot.started_at = "loading", time.monotonic()
        threading.Thread(target=self._load, args=(slot, True), name=f"load:{slot.config.id}", daemon=True).start()

    def _load(self, slot: _Slot, claimed: bool = False) -> None:
        if not claimed:
            with self._lock:
                if slot.state != "pending":
                    return
                slot.state, slot.started_at = "loading", time.monotonic()
        try:
            model = load_model(slot.config, self.limits, self._on_batch)
            model.batcher.start()
        except Exception as exc:
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model failed to load", extra={"model": slot.config.id, "error": slot.error})
            slot.ready.set()
            return
        self._estimate = model.load_seconds
        slot.model, slot.state = model, "ready"
        slot.ready.set()
        if self._on_ready:
            self._on_ready(model)

    def stop(self) -> None:
        for model in self.loaded():
            model.batcher.stop(timeout=5)
