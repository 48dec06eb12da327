"""Served models: loading a sentence-transformers folder in the background, finding it by name.

From the folder (read by `folder.read_folder`) we keep the tokenizer, the transformer (handed to a runtime)
and the small post-transformer head (pooling, Dense, Normalize), which the engine runs in numpy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import errors
from ..config import LimitsConfig, ModelConfig, ProviderConfig
from ..runtimes import MODES as RUNTIME_MODES
from ..runtimes import threads
from ..runtimes.base import Runtime
from .batcher import Batcher, BatchStats
from .folder import FolderError, ModelFolder, read_folder
from .pooling import pool
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
    # The folder it was loaded from, and for a model named by Hugging Face id the commit that was served.
    path: str = ""
    commit: str = ""
    # How `precision: auto` chose: {"tried", "min_cosine" (to fp32, on PROBE_TEXTS), "chosen"}; None when configured.
    fidelity: dict | None = None

    @property
    def id(self) -> str:
        return self.config.id


def load_model(
    config: ModelConfig,
    limits: LimitsConfig,
    on_batch: Callable[[str, BatchStats], None] | None = None,
    inference_threads: int = 0,
    on_failure: Callable[[bool], None] | None = None,
    on_recovery: Callable[[], None] | None = None,
) -> ServedModel:
    """Loads one model folder (blocking; call it off the event loop)."""
    started = time.perf_counter()
    commit = ""
    if config.repo:  # from the Hugging Face cache, every file checked against its hash; never downloaded here
        from .hub import snapshot

        snap = snapshot(config.repo, config.revision)
        path, commit = str(snap.path), snap.commit
    else:
        path = config.resolved_path()
    runtime_name, precision = resolve_mode(config)
    log.info("loading model", extra={"model": config.id, "path": path, "mode": f"{runtime_name}/{precision}",
                                     **({"repo": config.repo, "revision": config.revision or "main", "commit": commit} if commit else {})})
    try:
        folder = read_folder(path)
    except (OSError, FolderError) as e:
        raise ValueError(f"{config.id}: {e}") from None
    max_seq = config.max_seq_length or folder.max_seq_length
    tokenizer = TextTokenizer(folder.tokenizer, max_seq, folder.vocab_size, lowercase=folder.lowercase)
    n_threads = threads.configure(inference_threads)
    runtime = make_runtime(runtime_name, precision, folder, n_threads)
    modes, dense, include_prompt = folder.pooling_modes, folder.dense, folder.include_prompt

    def head(token_embeddings: np.ndarray, mask: np.ndarray, prompt_lengths: np.ndarray) -> np.ndarray:
        pooled = pool(token_embeddings, mask, modes, None if include_prompt else prompt_lengths)
        for layer in dense:
            pooled = layer(pooled).astype(np.float32, copy=False)
        return pooled

    fidelity = None
    if config.precision == "auto" and runtime.precision != "fp32":
        # `auto` promises cosine >= FIDELITY_BAR to fp32: kept per model, on the probe texts, or fp32 it is.
        tried = runtime.precision
        try:
            lowest = precision_fidelity(runtime, runtime_name, folder, tokenizer, head, n_threads)
        except Exception as e:  # the reference could not be built: no promise can be checked, so none is made
            log.warning("the bf16 check could not run: serving fp32", extra={"model": config.id, "error": f"{type(e).__name__}: {e}"})
            lowest = float("nan")
        fidelity = {"tried": tried, "min_cosine": round(lowest, 6) if lowest == lowest else None,
                    "chosen": tried if lowest >= FIDELITY_BAR else "fp32"}
        if fidelity["chosen"] == "fp32":
            log.warning("bf16 misses the fidelity bar for this model: serving fp32",
                        extra={"model": config.id, "min_cosine": fidelity["min_cosine"], "bar": FIDELITY_BAR})
            del runtime  # before the fp32 one is built: never both in memory at once
            runtime = make_runtime(runtime_name, "fp32", folder, n_threads)
    elif config.precision == "auto":
        fidelity = {"tried": "fp32", "min_cosine": 1.0, "chosen": "fp32",
                    "why": "no bf16 units on this CPU" if not cpu_has_bf16() else f"the {runtime_name} runtime runs fp32 here"}

    batcher = Batcher(
        config.id,
        runtime,
        head,
        folder.dimension,
        tokenizer.pad_id,
        limits.max_batch_tokens,
        limits.max_batch_size,
        on_batch=(lambda stats: on_batch(config.id, stats)) if on_batch else None,
        max_width=max_seq,
        on_failure=on_failure,
        on_recovery=on_recovery,
    )
    served = ServedModel(
        config=config,
        tokenizer=tokenizer,
        runtime=runtime,
        batcher=batcher,
        dimension=folder.dimension,
        normalizes=folder.normalize,
        prompts={**folder.prompts, **config.prompts},
        default_prompt_name=folder.default_prompt_name,
        include_prompt=include_prompt,
        load_seconds=0.0,
        path=path,
        commit=commit,
        fidelity=fidelity,
    )
    # One forward pass so the first caller does not pay for lazy initialisation.
    ids = np.array([tokenizer.encode(["warm up"], truncate=True)[0].ids])
    runtime.forward(ids, np.ones_like(ids), np.zeros_like(ids))
    served.load_seconds = time.perf_counter() - started
    log.info(
        "model ready",
        extra={"model": config.id, "runtime": runtime.describe(), "streams": runtime.streams, "dimension": served.dimension,
               "max_seq_length": max_seq, "seconds": round(served.load_seconds, 2), **({"commit": commit} if commit else {}),
               **({"precision_check": fidelity} if fidelity else {})},
    )
    return served


# What `precision: auto` promises: cosine to fp32 at least this, on every probe text, for the model being served.
FIDELITY_BAR = 0.9999
# Texts each model's bf16 is checked on at load: short queries and long passages, prose, code, numbers, other scripts.
PROBE_TEXTS = [
    "hi",
    "What is the capital of France?",
    "how do I reset my password",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a stage in front of a small crowd.",
    "def embed(texts: list[str]) -> np.ndarray: return model.encode(texts, normalize_embeddings=True)",
    "Invoice #4471, due 2026-03-01: 3 x 19.99 EUR, VAT 21 %, total 72.57 EUR.",
    "Le chat dort sur le canapé pendant que la pluie tombe doucement sur la ville.",
    "東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
    "Photosynthesis converts light energy into chemical energy: in the chloroplasts, water is split, oxygen is released, "
    "and the energy captured is stored in ATP and NADPH, which the Calvin cycle then spends to fix carbon dioxide into "
    "sugars. The rate depends on light intensity, temperature and the concentration of carbon dioxide, and plants "
    "adapted to hot, dry climates use C4 or CAM pathways to limit the water they lose while their stomata are open.",
    " ".join(["Embeddings map text to vectors so that similar meanings lie close together."] * 12),
]


def precision_fidelity(runtime: Runtime, runtime_name: str, folder: ModelFolder, tokenizer: TextTokenizer,
                       head: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], threads: int) -> float:
    """The lowest cosine, over PROBE_TEXTS, between `runtime`'s pooled vectors and fp32's (ONNX Runtime's fp32 for
    OpenVINO: the same exported graph, one session, dropped after)."""
    reference = make_runtime("onnx" if runtime_name == "openvino" else runtime_name, "fp32", folder, threads)
    lowest = 1.0
    for text in PROBE_TEXTS:
        ids = np.array([tokenizer.encode([text], truncate=True)[0].ids], dtype=np.int64)
        mask, types, none = np.ones_like(ids), np.zeros_like(ids), np.zeros(1, dtype=np.int64)
        a = head(runtime.forward(ids, mask, types), mask, none)[0]
        b = head(reference.forward(ids, mask, types), mask, none)[0]
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        lowest = min(lowest, cosine if np.isfinite(cosine) else -1.0)  # a NaN or inf vector is as far as can be
    return lowest


def cpu_has_bf16() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_mode(config: ModelConfig) -> tuple[str, str]:
    """The (runtime, precision) a model runs with; `auto` is the fastest mode that keeps cosine ≥ 0.9999.

    Measured here (bench/RESULTS.md): OpenVINO bf16 is the fastest such mode on CPUs with bf16 units,
    with the lowest latency too; without them bf16 is emulated and slow, so fp32.
    """
    runtime = config.runtime
    if runtime == "auto":
        runtime = "openvino" if importlib.util.find_spec("openvino") else "torch"
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if runtime in ("openvino", "torch") and cpu_has_bf16() else "fp32"
    if (runtime, precision) not in RUNTIME_MODES:
        supported = ", ".join(f"{r}/{p}" for r, p in RUNTIME_MODES)
        raise ValueError(f"{config.id}: {runtime}/{precision} is not a supported mode (supported: {supported})")
    return runtime, precision


def make_runtime(runtime: str, precision: str, folder: ModelFolder, threads: int) -> Runtime:
    # Imported here: a server on OpenVINO never loads torch.
    if runtime == "torch":
        from ..runtimes.pytorch import TorchRuntime

        return TorchRuntime(str(folder.transformer_path), precision, threads)
    if runtime == "onnx":
        from ..runtimes.onnxrt import OnnxRuntime

        return OnnxRuntime(str(folder.transformer_path), precision, threads, folder.hidden_size)
    from ..runtimes.openvino import OpenVinoRuntime

    return OpenVinoRuntime(str(folder.transformer_path), precision, threads, folder.hidden_size)


@dataclass
class RemoteModel:
    """A model another (OpenAI-compatible) API serves: the pipeline forwards to its provider."""

    config: ModelConfig
    provider: object  # providers.openai.OpenAIProvider
    upstream_model: str

    @property
    def id(self) -> str:
        return self.config.id


@dataclass
class _Slot:
    config: ModelConfig
    state: str = "pending"  # pending | loading | ready | failed
    model: ServedModel | None = None
    error: str = ""
    started_at: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)
    # Callers waiting for this load to settle: (their event loop, the future the loader thread resolves).
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)


def _wake(woken: asyncio.Future) -> None:
    if not woken.done():  # a waiter that timed out or went away meanwhile
        woken.set_result(None)


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
        inference_threads: int = 0,
        providers: list[ProviderConfig] | None = None,
        on_failure: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.limits = limits
        self.inference_threads = inference_threads
        self.provider_configs = {p.name: p for p in providers or []}
        self._providers: dict[str, object] = {}
        self._slots = {c.id: _Slot(c) for c in configs}
        self._names: dict[str, str] = {}
        for c in configs:
            self._names[c.id] = c.id
            for a in c.aliases:
                self._names[a] = c.id
        self.default_id = next(c.id for c in configs if c.default)
        self._on_ready = on_ready
        self._on_batch = on_batch
        self._on_failure = on_failure
        self._estimate = self.DEFAULT_LOAD_ESTIMATE
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiting = 0  # callers in `_wait_loaded`, on the event loop

    # -- lookup ---------------------------------------------------------------------------------

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

    def config(self, name: str) -> ModelConfig:
        """The configuration of the model `name` (an id or alias) names."""
        return self._slots[self.resolve(name)].config

    def state(self, model_id: str) -> str:
        return self._slots[model_id].state

    def loaded(self) -> list[ServedModel]:
        return [s.model for s in self._slots.values() if s.model is not None]

    def provider(self, name: str):
        """The client of a configured provider (created on first use), or None if there is no such provider."""
        if name not in self.provider_configs:
            return None
        if name not in self._providers:
            from ..providers.openai import OpenAIProvider

            self._providers[name] = OpenAIProvider(self.provider_configs[name])
        return self._providers[name]

    async def close_providers(self) -> None:
        for p in self._providers.values():
            await p.close()  # type: ignore[attr-defined]

    def peek(self, name: str) -> tuple[str, ServedModel | RemoteModel | None]:
        """The state of the model `name` names and the model if it can serve now, without causing any work (a probe
        must never start a lazy model's load): ("remote" | "loaded" | "pending" | "loading" | "failed", model)."""
        slot = self._slots[self.resolve(name)]
        if slot.config.provider:
            return "remote", RemoteModel(slot.config, self.provider(slot.config.provider), slot.config.upstream_model or slot.config.id)
        if slot.model is not None:
            return "loaded", slot.model
        return slot.state, None

    async def get(self, name: str, wait: bool = True, timeout: float | None = None) -> ServedModel | RemoteModel:
        """The model for `name`; while it loads, waits (bounded by `timeout`) or answers UNAVAILABLE."""
        slot = self._slots[self.resolve(name)]
        if slot.config.provider:
            return RemoteModel(slot.config, self.provider(slot.config.provider), slot.config.upstream_model or slot.config.id)
        if slot.model is not None:
            return slot.model
        if slot.state == "pending" and slot.config.load == "lazy":
            self._load_in_background(slot)
        if slot.state == "failed":
            # The cause (paths, file names) is in the server's log, not in an answer to a caller.
            raise errors.ServiceError(
                errors.grpc.StatusCode.UNAVAILABLE, f"Model {slot.config.id} failed to load on this server; its operator can see why in the server log.",
                reason="MODEL_FAILED",
            )
        if not wait:
            raise errors.model_loading(slot.config.id, self._remaining(slot))
        await self._wait_loaded(slot, timeout)
        if slot.model is None:  # loading failed
            return await self.get(name, wait=False)
        return slot.model

    async def _wait_loaded(self, slot: _Slot, timeout: float | None) -> None:
        """Until `slot`'s load settles (loaded or failed), at most `timeout` seconds. The loader thread wakes every
        waiter at once: a thousand callers waiting on a load cost the event loop nothing (each polled it 20 times a
        second before). At most `limits.max_concurrent_requests` callers wait at once (they hold no place of the
        requests being worked on: a flood naming a loading model must not starve the loaded ones); the rest are told
        when to come back, as a caller that asked not to wait is."""
        if self._waiting >= self.limits.max_concurrent_requests:
            raise errors.model_loading(slot.config.id, self._remaining(slot))
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        with self._lock:
            if slot.ready.is_set():
                return
            slot.waiters.append((loop, woken))
        self._waiting += 1
        try:
            await asyncio.wait_for(woken, timeout)
        except asyncio.TimeoutError:
            raise errors.model_loading(slot.config.id, self._remaining(slot)) from None
        finally:
            self._waiting -= 1
            with self._lock:
                if (loop, woken) in slot.waiters:
                    slot.waiters.remove((loop, woken))

    def _settle(self, slot: _Slot) -> None:
        """The load of `slot` ended (its model or its failure is in place): wakes whoever waits for it."""
        with self._lock:
            slot.ready.set()
            waiters, slot.waiters = slot.waiters, []
        for loop, woken in waiters:
            try:
                loop.call_soon_threadsafe(_wake, woken)
            except RuntimeError:  # its loop closed meanwhile (the server is stopping)
                pass

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
            if slot.config.provider:  # nothing to load: served as soon as we are
                slot.state = "ready"
                self._settle(slot)
                if self._on_ready:
                    self._on_ready(RemoteModel(slot.config, None, slot.config.upstream_model or slot.config.id))
            elif slot.config.load == "startup":
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
        model_id = slot.config.id

        def failed(permanent: bool) -> None:
            if self._on_failure:
                self._on_failure(model_id, permanent)

        def recovered() -> None:
            if self._on_ready and slot.model is not None:
                self._on_ready(slot.model)

        try:
            model = load_model(slot.config, self.limits, self._on_batch, self.inference_threads, failed, recovered)
            model.batcher.start()
        except Exception as exc:
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("model failed to load", extra={"model": slot.config.id, "error": slot.error})
            self._settle(slot)
            return
        self._estimate = model.load_seconds
        slot.model, slot.state = model, "ready"
        self._settle(slot)
        if self._on_ready:
            self._on_ready(model)

    def stop(self) -> None:
        for model in self.loaded():
            model.batcher.stop(timeout=5)
