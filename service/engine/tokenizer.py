"""Tokenization with the model's own fast tokenizer, run off the inference thread.

The `tokenizers` library releases the GIL, so requests are tokenized on a small pool of threads
while the batcher's thread runs the model: the two overlap instead of taking turns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .. import errors
from .wordpiece import AsciiWordPiece


@dataclass(frozen=True)
class Tokens:
    """One input, ready for the model: ids with special tokens, after truncation."""

    ids: np.ndarray  # int64
    type_ids: np.ndarray  # int64
    # Leading tokens that belong to the prompt (for pooling with include_prompt=False); 0 otherwise.
    prompt_length: int = 0

    def __len__(self) -> int:
        return len(self.ids)


# `encode_batch` lets go of the GIL while it works; `encode` holds it: a 200,000-character text took every other
# thread's turn, the event loop's included, for ~150 ms. One short text goes through `encode` (less overhead).
LONG_TEXT = 4096


def _batch(texts: list[str]) -> bool:
    return len(texts) > 1 or len(texts[0]) > LONG_TEXT


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_seq_length: int, vocab_size: int, lowercase: bool = False) -> None:
        self.max_seq_length = max_seq_length
        # sentence_bert_config's do_lower_case: sentence-transformers lowercases the text before tokenizing.
        self.lowercase = lowercase
        self.vocab_size = vocab_size
        self.pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
        # One configured copy per truncation side: the settings are per object, and objects are shared by threads.
        self._variants: dict[str, Tokenizer] = {}
        for side in ("right", "left", "none"):
            tok = Tokenizer.from_str(tokenizer.to_str())
            tok.no_padding()
            if side == "none":
                tok.no_truncation()
            else:
                tok.enable_truncation(max_seq_length, direction=side)
            self._variants[side] = tok
        # Plain-ASCII text of a WordPiece model, tokenized in Python where that is cheaper (see `quick_ids`).
        self._quick = AsciiWordPiece.of(tokenizer)
        # How many special tokens an encoded text starts and ends with ([CLS] … [SEP]: 1 and 1).
        mask = self._variants["none"].encode("a").special_tokens_mask
        lead = next((i for i, m in enumerate(mask) if not m), len(mask))
        trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0) if lead < len(mask) else 0
        self.specials = (lead, trail)

    def encode(self, texts: list[str], truncate: bool, direction: str = "right", param: str = "input", offset: int = 0) -> list[Tokens]:
        """Tokenizes `texts`; an input over the model's limit is cut from `direction` or refused (named by `offset + i`)."""
        tok = self._variants[direction]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        encodings = tok.encode_batch(texts) if _batch(texts) else [tok.encode(texts[0])]
        out = []
        for i, enc in enumerate(encodings):
            if enc.overflowing and not truncate:
                full = len(self._variants["none"].encode(texts[i]).ids)
                raise errors.invalid_argument(
                    f"Input {offset + i} is {full} tokens long; this model reads at most {self.max_seq_length} tokens. "
                    "Shorten it or ask for truncation.",
                    param=param,
                    reason="context_length_exceeded",
                )
            out.append(Tokens(np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.type_ids, dtype=np.int64)))
        return out

    def quick_ids(self, texts: list[str]) -> list[np.ndarray] | None:
        """The ids of `texts` (special tokens added) when every one is short plain ASCII of a WordPiece model, else None.

        For a small request on the event loop: the library's answer (tests/test_wordpiece.py), without its character
        alignments, ~6× faster (wordpiece.py). Pure Python holds the GIL, so never for the tokenizer pool's large work.
        """
        if self._quick is None:
            return None
        out = []
        for text in texts:
            ids = self._quick.encode(text.lower() if self.lowercase else text, self.max_seq_length)
            if ids is None:
                return None
            out.append(np.array(ids, dtype=np.int64))
        return out

    def from_ids(self, sequences: list[list[int]], truncate: bool, direction: str = "right", param: str = "input") -> list[Tokens]:
        """Token ids given by the caller, used as they are (no special tokens added), as other servers do."""
        out = []
        for i, ids in enumerate(sequences):
            if len(ids) == 0:
                raise errors.invalid_argument(f"Input {i} is an empty list of tokens.", param=param)
            arr = np.asarray(ids, dtype=np.int64)
            if arr.min() < 0 or arr.max() >= self.vocab_size:
                raise errors.invalid_argument(
                    f"Input {i} holds a token id outside this model's vocabulary [0, {self.vocab_size}).", param=param
                )
            if len(arr) > self.max_seq_length:
                if not truncate:
                    raise errors.invalid_argument(
                        f"Input {i} is {len(arr)} tokens long; this model reads at most {self.max_seq_length} tokens.",
                        param=param,
                        reason="context_length_exceeded",
                    )
                arr = arr[-self.max_seq_length :] if direction == "left" else arr[: self.max_seq_length]
            out.append(Tokens(arr, np.zeros_like(arr)))
        return out

    def prompt_length(self, prompt: str) -> int:
        """Tokens a prompt adds in front (with the leading special token), as sentence-transformers counts them."""
        return len(self._variants["right"].encode(prompt).ids) - 1

    # -- detailed tokenization (Tokenize / decode APIs); the methods above are the embedding path ------------------

    def encode_detailed(self, texts: list[str], add_special_tokens: bool = True, truncate: bool = False, direction: str = "right"):
        """The tokenizer's full `Encoding`s of `texts` (ids, tokens, character offsets, special-token mask, overflow).

        `truncate`: cut to the model's max_seq_length from `direction`, as the embedding path does (an encoding's
        `overflowing` is then non-empty when it was cut); otherwise the whole text. Texts are lowercased first where the
        model's folder says so, as `encode` does: the ids are the ones the model reads.
        """
        tok = self._variants[direction if truncate else "none"]
        if self.lowercase:
            texts = [t.lower() for t in texts]
        if not _batch(texts):
            return [tok.encode(texts[0], add_special_tokens=add_special_tokens)]
        return tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The vocabulary's string for one id (a special token's text: '[CLS]')."""
        return self._variants["none"].id_to_token(token_id) or ""

    def decode(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """Token ids back to text (ids outside the vocabulary are skipped, as the tokenizer does)."""
        tok = self._variants["none"]
        if len(sequences) == 1:
            return [tok.decode(sequences[0], skip_special_tokens=skip_special_tokens)]
        return tok.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
