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
import numpy as np

from .. import errors
from .models import RemoteModel, ServedModel
from .pipeline import Embedder

# Inputs per call in the tokenizer thread; between chunks it checks whether anyone still waits.
CHUNK = 128


@dataclass
class Encoded:
    """One input, tokenized (a view into its request's `Tokenized`)."""

    # What was tokenized: the prompt (if any) followed by the input.
    text: str
    # int32 token ids.
    ids: np.ndarray
    # int32 (n, 2): character offsets of each token in `text`; (0, 0) for special tokens.
    offsets: np.ndarray
    # uint8: 1 where the token is a special token.
    special: np.ndarray
    # The special tokens' strings ('[CLS]', '[SEP]'), in order (a token's other text is `text[start:stop]`).
    special_texts: list[str]
    # The input was longer than the model reads and was cut (only when asked to truncate).
    truncated: bool = False


@dataclass
class Tokenized:
    """A request's inputs, tokenized, as a few flat arrays: nothing per token, and nothing per input but its text.

    It crosses to an offload worker to be printed, and pickling holds the GIL (so the event loop) for the whole
    crossing: 800k tokens as per-token Python lists held it 230-400 ms (a hostile review's repro), as 2,000 small
    arrays per field ~50 ms (~8 us an array); as flat int32 arrays ~10 ms, their bytes' copy."""

    model: str  # canonical id
    texts: list[str]
    # Tokens of each input; the flat arrays below hold input 0's tokens, then input 1's, ...
    lengths: np.ndarray
    ids: np.ndarray  # int32 (every id and offset here is far below 2**31)
    offsets: np.ndarray  # int32 (n, 2)
    special: np.ndarray  # uint8
    special_texts: list[str]  # every input's special tokens' strings, in order
    truncated: list[bool]
    seconds: float = 0.0

    @property
    def encodings(self) -> list[Encoded]:
        """One `Encoded` per input (views, built on each call: they never cross to a worker)."""
        bounds = np.cumsum(self.lengths)[:-1]
        specials = iter(self.special_texts)
        return [
            Encoded(text, ids, offsets, special, [next(specials) for _ in range(int(special.sum()))], cut)
            for text, ids, offsets, special, cut in zip(self.texts, np.split(self.ids, bounds), np.split(self.offsets, bounds),
                                                        np.split(self.special, bounds), self.truncated)
        ]


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
    # Every token is five numbers of the answer: refused before tokenizing where the words alone pass the budget
    # (counted in the tokenizer's thread, text by text: on the event loop, 8 MiB of words held every caller ~130 ms).
    budget = embedder.limits.max_output_values // FIELDS_PER_TOKEN
    if deadline is None:
        deadline = time.monotonic() + embedder.limits.request_timeout_seconds
    model = await served_model(embedder, model_name, deadline)
    prompt = prompt_for(model, prompt_name)
    started = time.perf_counter()
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        with embedder.admitted():
            done = await loop.run_in_executor(
                embedder.executor, _encode, model, texts, prompt, add_special_tokens, truncate, direction, deadline, stop,
                budget, param,
            )
    except asyncio.CancelledError:
        stop.set()
        raise
    if len(done.ids) > budget:
        raise _too_large(budget, param)
    done.seconds = time.perf_counter() - started
    return done


FIELDS_PER_TOKEN = 5  # id, text, special, start, stop


def _too_large(budget: int, param: str) -> errors.ServiceError:
    return errors.invalid_argument(
        f"This would tokenize to more than {budget} tokens; at most that many are answered (limits.max_output_values): send "
        "fewer or shorter inputs.", param, "RESPONSE_TOO_LARGE",
    )


def _encode(model: ServedModel, texts: list[str], prompt: str, add_special_tokens: bool, truncate: bool, direction: str,
            deadline: float | None, stop: threading.Event, budget: int | None = None, param: str = "inputs") -> Tokenized:
    # Every word is at least one token (truncated, an input is at most the model's limit): too many, and the answer
    # would pass `budget`, so nothing is tokenized.
    if budget is not None and (not truncate or len(texts) * model.tokenizer.max_seq_length > budget):
        words = 0
        for t in texts:
            words += len(t.split()) if not truncate else min(len(t.split()), model.tokenizer.max_seq_length)
            if words > budget:
                raise _too_large(budget, param)
    seen: list[str] = []
    ids: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    special: list[np.ndarray] = []
    truncated: list[bool] = []
    for start in range(0, len(texts), CHUNK):
        if stop.is_set():
            raise asyncio.CancelledError()
        if deadline is not None and time.monotonic() > deadline:
            raise errors.ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "The request's deadline passed while it was tokenized.", reason="DEADLINE_EXCEEDED")
        chunk = [prompt + t for t in texts[start : start + CHUNK]] if prompt else texts[start : start + CHUNK]
        for text, enc in zip(chunk, model.tokenizer.encode_detailed(chunk, add_special_tokens, truncate, direction)):
            seen.append(text)
            ids.append(np.array(enc.ids, dtype=np.int32))
            offsets.append(np.array(enc.offsets, dtype=np.int32).reshape(-1, 2))
            special.append(np.array(enc.special_tokens_mask, dtype=np.uint8))
            truncated.append(bool(enc.overflowing))
    flat_ids, flat_special = np.concatenate(ids), np.concatenate(special)
    return Tokenized(model.id, seen, np.array([len(a) for a in ids], dtype=np.int64), flat_ids, np.concatenate(offsets), flat_special,
                     [model.tokenizer.token_text(int(t)) for t in flat_ids[flat_special == 1]], truncated)


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
