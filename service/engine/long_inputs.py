"""What happens to an input longer than the model reads: one policy, shared by every dialect.

- `refuse`: a 400 that says how long the input is and what the model reads.
- `truncate`: cut to the model's `max_seq_length` from the request's truncation side (sentence-transformers'
  behaviour), and counted, so a response can say how many inputs lost text.
- `chunk`: split into windows of `max_seq_length` tokens (special tokens and the prompt in each), consecutive
  windows sharing `limits.chunk_overlap_tokens` tokens; every window goes through the batcher like any other input
  (batched with everyone's work, under the token budget and the fairness rules), and the input's vector is the
  token-count-weighted mean of its windows' pooled vectors, then the model's normalization. An input that fits in
  one window is embedded exactly as before.

Caps keep a request's cost bounded whatever the policy: `limits.max_input_tokens` tokens per input and
`limits.max_windows_per_request` windows per request.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

import numpy as np

from .. import errors
from .tokenizer import TextTokenizer, Tokens

POLICIES = ("refuse", "truncate", "chunk")


@dataclass
class Tokenized:
    """A request's inputs as the batcher's items: each input is one item, or (chunked) several windows."""

    items: list[Tokens] = field(default_factory=list)
    # groups[i]: the items of input i, in order.
    groups: list[list[int]] = field(default_factory=list)
    # Per input: the identity of what the model reads, for the cache (ids of the whole input).
    keys: list[bytes] = field(default_factory=list)
    truncated: int = 0
    chunked: int = 0
    # The inputs (by position) cut to the model's limit (`truncated` counts them).
    cut: set[int] = field(default_factory=set)
    # Per input: its tokens (what usage reports), counted once: a chunked input's windows repeat its special tokens,
    # its prompt and `limits.chunk_overlap_tokens`, which no API bills (1,000 words were 1,138 tokens in windows).
    lengths: list[int] = field(default_factory=list)

    def add(self, tokens: list[Tokens], key: bytes, length: int | None = None) -> None:
        self.groups.append(list(range(len(self.items), len(self.items) + len(tokens))))
        self.items += tokens
        self.keys.append(key)
        self.lengths.append(sum(len(t) for t in tokens) if length is None else length)

    def tokens_read(self, i: int) -> int:
        return self.lengths[i]

    def combine(self, pooled_items: np.ndarray, rows: list[int] | None = None) -> np.ndarray:
        """Per input (of `rows`, default all): its item's pooled vector, or its windows' token-weighted mean."""
        rows = list(range(len(self.groups))) if rows is None else rows
        out = np.empty((len(rows), pooled_items.shape[1]), dtype=np.float32)
        for r, i in enumerate(rows):
            group = self.groups[i]
            if len(group) == 1:
                out[r] = pooled_items[group[0]]
            else:
                weights = np.array([len(self.items[j]) for j in group], dtype=np.float64)
                out[r] = (pooled_items[group].astype(np.float64) * weights[:, None]).sum(axis=0) / weights.sum()
        return out


def _specials(mask: list[int]) -> tuple[int, int]:
    """How many special tokens an encoding starts and ends with ([CLS] … [SEP]: 1 and 1)."""
    n = len(mask)
    lead = 0
    while lead < n and mask[lead]:
        lead += 1
    trail = 0
    while trail < n - lead and mask[n - 1 - trail]:
        trail += 1
    return lead, trail


def windows(ids: np.ndarray, mask: list[int], max_len: int, prompt_tokens: int, overlap: int) -> list[np.ndarray]:
    """`ids` (a whole encoding, special tokens included) as windows of at most `max_len` tokens: each window is the
    leading special tokens, the prompt's tokens, a slice of the content, and the trailing special tokens."""
    lead, trail = _specials(mask)
    head = ids[: lead + prompt_tokens]
    tail = ids[len(ids) - trail :]
    content = ids[lead + prompt_tokens : len(ids) - trail]
    room = max_len - len(head) - len(tail)
    if room < 1:
        raise errors.invalid_argument("The prompt leaves no room for text in a window of this model.", "prompt_name")
    step = max(1, room - min(overlap, room - 1))
    out = []
    start = 0
    while True:
        out.append(np.concatenate([head, content[start : start + room], tail]))
        if start + room >= len(content):
            return out
        start += step


# No token is read from more characters than this (WordPiece turns a word of up to 100 characters into one [UNK]; a
# run of spaces is no token at all, which is why a clipped text that came out short is tokenized again, whole).
CHARS_PER_TOKEN = 32


def _too_many_windows(max_windows: int, limit: int, param: str) -> errors.ServiceError:
    return errors.invalid_argument(
        f"This request needs more than {max_windows} windows of {limit} tokens (limits.max_windows_per_request); "
        "send fewer or shorter inputs per request.", param, "TOO_MANY_WINDOWS",
    )


def _longer_than_model(position: int, n: int, limit: int, param: str, at_least: bool = False, limit_of: str = "this model") -> errors.ServiceError:
    return errors.invalid_argument(
        f"Input {position} is {'at least ' if at_least else ''}{n} tokens long; {limit_of} reads at most {limit} tokens. "
        "Shorten it, or ask for truncation (or chunking, where this API has it).", param, "context_length_exceeded",
    )


def _longer_than_cap(position: int, n: int, max_input_tokens: int, param: str) -> errors.ServiceError:
    return errors.invalid_argument(
        f"Input {position} is {n} tokens long; at most {max_input_tokens} tokens are read per input "
        "(limits.max_input_tokens).", param, "INPUT_TOO_LONG",
    )


def _sure_windows(n: int, limit: int) -> int:
    """At least how many windows an input of at least `n` tokens takes (windows hold at most `limit` tokens)."""
    return max(1, -(-n // limit))


def check_words(texts: list[str], limit: int, max_input_tokens: int, max_windows: int, param: str) -> None:
    """Refuses, before anything is tokenized, a chunked request that is sure to pass the caps: every word is at least
    one token. Only what `_place` would refuse: an input over both the model's window and `max_input_tokens`, or,
    once some input is chunked, more windows in all than `max_windows`. Words are counted only up to what decides
    (`split` with a bound, and no further once the windows are past the cap), so a 16 MiB text costs one pass, not
    millions of strings."""
    cap = max(limit, max_input_tokens)
    windows, chunked = 0, False
    for i, text in enumerate(texts):
        if len(text) < 2 * limit:  # fewer than `limit` words: decides nothing
            windows += 1
            continue
        words = len(text.split(None, cap))  # at most cap + 1 strings
        if words > cap:
            raise errors.invalid_argument(
                f"Input {i} has more than {max_input_tokens} words, so more than {max_input_tokens} tokens; at most "
                f"{max_input_tokens} tokens are read per input (limits.max_input_tokens).", param, "INPUT_TOO_LONG",
            )
        chunked = chunked or words > limit
        windows += _sure_windows(words, limit)
        if chunked and windows > max_windows:  # decided: stop counting
            raise _too_many_windows(max_windows, limit, param)
    if chunked and windows > max_windows:
        raise _too_many_windows(max_windows, limit, param)


def check_ids(sequences: list, policy: str, limit: int, max_input_tokens: int, max_windows: int, param: str) -> None:
    """Refuses, from the lists' lengths alone, token ids that are sure to be refused once converted: the same answer
    whatever the load, and before admission (a request no queue could ever take must not be told to retry). Only what
    `from_ids`/`_place` would refuse: under `refuse` an input over the window; under `chunk` an input over both the
    window and `max_input_tokens`, or, once some input is chunked, more windows in all than `max_windows`."""
    cap = max(limit, max_input_tokens)
    windows, chunked = 0, False
    for i, seq in enumerate(sequences):
        n = len(seq)
        if policy == "refuse" and n > limit:
            raise _longer_than_model(i, n, limit, param)
        if policy == "chunk" and n > cap:
            raise _longer_than_cap(i, n, max_input_tokens, param)
        chunked = chunked or n > limit
        windows += _sure_windows(n, limit)
    if policy == "chunk" and chunked and windows > max_windows:
        raise _too_many_windows(max_windows, limit, param)


def _clip(text: str, tokens: int, direction: str) -> str:
    """The part of `text` that holds its first (or, from the left, last) `tokens` tokens, with room to spare."""
    room = (tokens + 8) * CHARS_PER_TOKEN
    if len(text) <= room:
        return text
    return text[-room:] if direction == "left" else text[:room]


def tokenize(
    tokenizer: TextTokenizer,
    texts: list[str],
    policy: str,
    direction: str,
    param: str,
    prompt_tokens: int,
    max_input_tokens: int,
    max_windows: int,
    overlap: int,
    offset: int = 0,
    tokenized: Tokenized | None = None,
    quick: bool = False,
) -> Tokenized:
    """`texts` (prompt already in front) as batcher items under `policy`; adds to `tokenized` when given.

    `prompt_tokens`: how many tokens after the leading special ones are the prompt's (repeated in every window).
    `offset`: the position of texts[0] in the request, for error messages.
    `quick`: try the tokenizer's pure-Python path first (a small request, on the event loop).
    """
    out = tokenized if tokenized is not None else Tokenized()
    limit = tokenizer.max_seq_length
    if quick and (every := tokenizer.quick_ids(texts)) is not None:
        # Each fits the model whole (quick_ids declines any that does not): as every policy places a fitting input.
        for ids in every:
            out.add([Tokens(ids, np.zeros_like(ids))], ids.tobytes())
        return out
    partial: set[int] = set()  # inputs whose encoding is of their clipped part only
    if policy == "chunk":
        encodings = tokenizer.encode_detailed(texts)
    else:
        # Cut or refused past `limit` tokens: tokenizing more than the part that holds them is wasted work (a 200,000-
        # character input costs ~50 ms of a core; its first few thousand characters, well under one).
        clipped = [_clip(t, limit, direction) for t in texts]
        encodings = tokenizer.encode_detailed(clipped, truncate=policy == "truncate", direction=direction)
        for i, (text, enc) in enumerate(zip(texts, encodings)):
            read = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing) if policy == "truncate" else len(enc.ids)
            if clipped[i] is not text:
                if read <= limit + 1:  # came out short (whitespace, say): the whole text after all
                    encodings[i] = tokenizer.encode_detailed([text], truncate=policy == "truncate", direction=direction)[0]
                else:
                    partial.add(i)
    for i, enc in enumerate(encodings):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if policy == "truncate":
            if enc.overflowing:
                out.truncated += 1
                out.cut.add(len(out.groups))
            out.add([Tokens(ids, np.asarray(enc.type_ids, dtype=np.int64))], ids.tobytes())
            continue
        _place(out, ids, np.asarray(enc.type_ids, dtype=np.int64), enc.special_tokens_mask, policy, limit, param, offset + i,
               prompt_tokens, max_input_tokens, max_windows, overlap, b"text", at_least=i in partial)
    _check_windows(out, max_windows, limit, param)
    return out


def cap(out: Tokenized, max_tokens: int, specials: tuple[int, int], prompt_tokens: int, policy: str, direction: str, param: str,
        cut_before: set[int]) -> None:
    """A caller's own limit below the model's (Ollama's num_ctx, Cohere's max_tokens), on inputs already placed whole:
    an input past `max_tokens` tokens is cut to them, or refused. What is cut is the text, from `direction`: the special
    tokens (`specials`: how many an input starts and ends with) and the model's prompt (`prompt_tokens`, after the
    leading special ones) stay, as in a window (`windows`); a limit that leaves no token of text is a 400. `cut_before`:
    the inputs the model's own limit already cut (counted as truncated then)."""
    lead, trail = specials
    fixed = lead + prompt_tokens + trail
    keep = max_tokens - fixed
    for i, group in enumerate(out.groups):
        tokens = out.items[group[0]]
        if len(group) != 1 or len(tokens.ids) <= max_tokens:
            continue
        if keep < 1:
            raise errors.invalid_argument(
                f"A limit of {max_tokens} tokens leaves no room for text: this model's special tokens and prompt take "
                f"{fixed}.", param, "MAX_TOKENS_TOO_SMALL")
        if policy == "refuse":
            raise _longer_than_model(i, len(tokens.ids), max_tokens, param, limit_of="this request")
        head, end = lead + prompt_tokens, len(tokens.ids) - trail
        text_ids, text_types = tokens.ids[head:end], tokens.type_ids[head:end]
        part = slice(len(text_ids) - keep, None) if direction == "left" else slice(0, keep)
        ids = np.concatenate([tokens.ids[:head], text_ids[part], tokens.ids[end:]])
        types = np.concatenate([tokens.type_ids[:head], text_types[part], tokens.type_ids[end:]])
        if i not in cut_before:
            out.truncated += 1
        out.items[group[0]] = dataclasses.replace(tokens, ids=ids, type_ids=types)
        out.keys[i] = ids.tobytes()
        out.lengths[i] = len(ids)


def _check_windows(out: Tokenized, max_windows: int, limit: int, param: str) -> None:
    """The cap on a request that chunks: at most `max_windows` windows in all, its unchunked inputs counted too (a
    request that chunks nothing is bounded by the input count alone)."""
    if out.chunked and len(out.items) > max_windows:
        raise _too_many_windows(max_windows, limit, param)


def from_ids(
    tokenizer: TextTokenizer,
    sequences: list,
    policy: str,
    direction: str,
    param: str,
    max_input_tokens: int,
    max_windows: int,
    overlap: int,
) -> Tokenized:
    """Token ids a caller sent (used as given: no special tokens are added), under `policy`."""
    out = Tokenized()
    limit = tokenizer.max_seq_length
    for i, seq in enumerate(sequences):
        ids = np.asarray(seq, dtype=np.int64)
        if len(ids) == 0:
            raise errors.invalid_argument(f"Input {i} is an empty list of tokens.", param)
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise errors.invalid_argument(f"Input {i} holds a token id outside this model's vocabulary [0, {tokenizer.vocab_size}).", param)
        if policy == "truncate":
            if len(ids) > limit:
                out.truncated += 1
                out.cut.add(len(out.groups))
                ids = ids[-limit:] if direction == "left" else ids[:limit]
            out.add([Tokens(ids, np.zeros_like(ids))], ids.tobytes())
            continue
        _place(out, ids, np.zeros_like(ids), [0] * len(ids), policy, limit, param, i, 0, max_input_tokens, max_windows, overlap, b"ids")
    _check_windows(out, max_windows, limit, param)
    return out


def _place(out: Tokenized, ids: np.ndarray, type_ids: np.ndarray, mask: list[int], policy: str, limit: int, param: str,
           position: int, prompt_tokens: int, max_input_tokens: int, max_windows: int, overlap: int, kind: bytes,
           at_least: bool = False) -> None:
    """One whole input under `refuse` or `chunk`: as it is when it fits, else refused or cut into windows."""
    if len(ids) <= limit:
        out.add([Tokens(ids, type_ids)], ids.tobytes())
        return
    if policy == "refuse":
        raise _longer_than_model(position, len(ids), limit, param, at_least)
    if len(ids) > max_input_tokens:
        raise _longer_than_cap(position, len(ids), max_input_tokens, param)
    parts = windows(ids, mask, limit, prompt_tokens, overlap)
    out.chunked += 1
    # The key names how the windows were cut: a text's windows repeat its special tokens and prompt, token ids' don't, so
    # the same ids sent as text and as ids are different inputs.
    out.add([Tokens(w, np.zeros_like(w)) for w in parts], b"chunk:%s:%d:%d:%d:" % (kind, limit, overlap, prompt_tokens) + ids.tobytes(),
            length=len(ids))
    _check_windows(out, max_windows, limit, param)  # early: a huge request stops at its first window past the cap
