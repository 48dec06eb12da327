"""Tokenization as an API (TEI's /tokenize and /decode, Inworld's Tokenize): a served model's own tokenizer.

The same tokenizer, prompts and limits as the embedding path: the ids `tokenize(..., truncate=True)` gives for
a text are the ids `Embedder.embed` feeds the model for it (the model's default prompt in front when the request
names none, special tokens included, cut to its max_seq_length). The work runs on the embedder's tokenizer
threads, never on the event loop, in chunks between which a caller that went away or a deadline that passed
stops it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc

from .. import errors
from .models import RemoteModel, ServedModel
from .pipeline import Embedder

# Inputs per call in the tokenizer thread; between chunks it checks whether anyone still waits.
CHUNK = 128


@dataclass
class Encoded:
    """One input, tokenized: plain data (it crosses to an offload worker to be printed)."""

    # What was tokenized: the prompt (if any) followed by the input.
    text: str
    ids: list[int]
    # The tokenizer's token strings ('[CLS]', '##ing').
    tokens: list[str]
    # Character offsets of each token in `text`; (0, 0) for special tokens.
    offsets: list[tuple[int, int]]
    # 1 where the token is a special token.
    special: list[int]
    # The input was longer than the model reads and was cut (only when asked to truncate).
    truncated: bool = False


@dataclass
class Tokenized:
    model: str  # canonical id
    encodings: list[Encoded]
    seconds: float = 0.0


async def served_model(embedder: Embedder, name: str, deadline: float | None = None) -> ServedModel:
    """The loaded model `name` names ('' is the default), waiting for it while it loads (until `deadline`)."""
    if deadline is None:
        deadline = time.monotonic() + embedder.limits.request_timeout_seconds
    model = await embedder.registry.get(name, wait=True, timeout=max(0.0, deadline - time.monotonic()))
    if isinstance(model, RemoteModel):
        raise errors.ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"The model {model.id} is served by the provider '{model.config.provider}'; its tokenizer is not available on this server.",
            reason="TOKENIZER_UNAVAILABLE",
            param="model",
        )
    return model


def _check_count(n: int, embedder: Embedder, param: str) -> None:
    if n == 0:
        raise errors.invalid_argument("At least one input is required; got none.", param, "EMPTY_INPUT")
    if n > embedder.limits.max_client_batch_size:
        raise errors.invalid_argument(
            f"Too many inputs: {n}; at most {embedder.limits.max_client_batch_size} per request.", param, "TOO_MANY_INPUTS"
        )


def prompt_for(model: ServedModel, prompt_name: str | None) -> str:
    """The prompt text a request's `prompt_name` selects (None: the model's default prompt, if it has one)."""
    if prompt_name is not None and prompt_name not in model.prompts:
        known = ", ".join(sorted(model.prompts)) or "none"
        raise errors.invalid_argument(f"Unknown prompt_name {prompt_name!r} for {model.id}; its prompts are: {known}.", "prompt_name")
    name = prompt_name if prompt_name is not None else model.default_prompt_name
    return model.prompts.get(name, "") if name else ""


async def tokenize(
    embedder: Embedder,
    model_name: str,
    texts: list[str],
    add_special_tokens: bool = True,
    prompt_name: str | None = None,
    truncate: bool = False,
    direction: str = "right",
    param: str = "inputs",
    deadline: float | None = None,
) -> Tokenized:
    """Tokenizes `texts` with the model's tokenizer; `truncate` cuts each to what the model reads (from `direction`)."""
    _check_count(len(texts), embedder, param)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise errors.invalid_argument(f"Input {i} is not a string.", param)
        if not text:
            raise errors.invalid_argument(f"Input {i} is an empty string; every input must have text.", param, "EMPTY_INPUT")
        if len(text) > embedder.limits.max_input_chars:
            raise errors.invalid_argument(
                f"Input {i} has {len(text)} characters; at most {embedder.limits.max_input_chars} are accepted.", param, "INPUT_TOO_LONG"
            )
    if direction not in ("right", "left"):
        raise errors.invalid_argument("truncation_direction must be Left or Right.", "truncation_direction")
    # Every word is at least one token, and every token five numbers of the answer: refuse before tokenizing.
    budget = embedder.limits.max_output_values // FIELDS_PER_TOKEN
    if sum(len(t.split()) for t in texts) > budget:
        raise _too_large(budget, param)
    if deadline is None:
        deadline = time.monotonic() + embedder.limits.request_timeout_seconds
    model = await served_model(embedder, model_name, deadline)
    prompt = prompt_for(model, prompt_name)
    started = time.perf_counter()
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        with embedder.admitted():
            encodings = await loop.run_in_executor(
                embedder.executor, _encode, model, texts, prompt, add_special_tokens, truncate, direction, deadline, stop
            )
    except asyncio.CancelledError:
        stop.set()
        raise
    if sum(len(e.ids) for e in encodings) > budget:
        raise _too_large(budget, param)
    return Tokenized(model.id, encodings, time.perf_counter() - started)


FIELDS_PER_TOKEN = 5  # id, text, special, start, stop


def _too_large(budget: int, param: str) -> errors.ServiceError:
    return errors.invalid_argument(
        f"This would tokenize to more than {budget} tokens; at most that many are answered (limits.max_output_values): send "
        "fewer or shorter inputs.", param, "RESPONSE_TOO_LARGE",
    )


def _encode(model: ServedModel, texts: list[str], prompt: str, add_special_tokens: bool, truncate: bool, direction: str,
            deadline: float | None, stop: threading.Event) -> list[Encoded]:
    out: list[Encoded] = []
    for start in range(0, len(texts), CHUNK):
        if stop.is_set():
            raise asyncio.CancelledError()
        if deadline is not None and time.monotonic() > deadline:
            raise errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request's deadline passed while it was tokenized.", reason="DEADLINE_EXCEEDED")
        chunk = [prompt + t for t in texts[start : start + CHUNK]] if prompt else texts[start : start + CHUNK]
        for text, enc in zip(chunk, model.tokenizer.encode_detailed(chunk, add_special_tokens, truncate, direction)):
            out.append(Encoded(text, enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask, bool(enc.overflowing)))
    return out


async def decode(
    embedder: Embedder,
    model_name: str,
    sequences: list[list[int]],
    skip_special_tokens: bool = True,
    param: str = "ids",
    deadline: float | None = None,
) -> tuple[str, list[str]]:
    """Token ids back to text with the model's tokenizer: (the model's id, one text per sequence)."""
    _check_count(len(sequences), embedder, param)
    for i, ids in enumerate(sequences):
        if len(ids) == 0:
            raise errors.invalid_argument(f"Sequence {i} is an empty list of token ids.", param, "EMPTY_INPUT")
        if len(ids) > embedder.limits.max_input_chars:
            raise errors.invalid_argument(
                f"Sequence {i} has {len(ids)} token ids; at most {embedder.limits.max_input_chars} are accepted.", param, "INPUT_TOO_LONG"
            )
    model = await served_model(embedder, model_name, deadline)
    loop = asyncio.get_running_loop()
    with embedder.admitted():
        texts = await loop.run_in_executor(embedder.executor, model.tokenizer.decode, [list(s) for s in sequences], skip_special_tokens)
    return model.id, texts
