"""BERT's WordPiece tokenization of plain-ASCII text in pure Python: the short request's fast path.

Why: a small request is tokenized on the event loop (a hop to a thread costs more than the work), and there the
`tokenizers` library spends ~120 µs on a 250-character text, most of it keeping character alignments (offsets) that
the embedding path never reads: about a fifth of the event loop's time under many one-text clients. For ASCII text,
BERT's normalizer and pre-tokenizer reduce to a character table and one regular expression, and most words repeat,
so their pieces come from a dictionary: ~20 µs for the same text.

Only where it is exactly the library's answer: `of` accepts a tokenizer only when its every stage is one this
module reproduces (BertNormalizer with clean_text, BertPreTokenizer, WordPiece with a `##` prefix, a template that
adds special tokens around the text with type id 0), and `encode` declines (None) any text it does not cover: one
with a non-ASCII character, one holding an added token's text ("[MASK]"), one that is longer than the model reads,
one with a word of over `_LONG_WORD` characters. The caller then asks the library. An added token whose own text is not printable ASCII ("résumé", normalized to
"resume" before matching) could match ASCII text in ways this module does not follow: such a tokenizer gets no fast
path at all. tests/test_wordpiece.py checks every answer against the library's.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import Tokenizer

# BertNormalizer's clean_text on ASCII: control characters go, tab / newline / carriage return become spaces.
_CLEAN = {**dict.fromkeys([c for c in range(32) if c not in (9, 10, 13)] + [127]), 9: 32, 10: 32, 13: 32}
# BertPreTokenizer on clean ASCII: split on spaces, every punctuation character (all non-alphanumeric printable
# ASCII is) a word of its own.
_WORDS = {True: re.compile(r"[a-z0-9]+|[^ a-z0-9]"), False: re.compile(r"[A-Za-z0-9]+|[^ A-Za-z0-9]")}
# A longer word is declined (the library takes the text): greedy longest-match costs up to n²/2 lookups in Python
# (a 100-character run of gibberish ~0.2 ms, a 40-character hex hash ~4× the library), and natural words are shorter.
_LONG_WORD = 24
# Words whose pieces are remembered: natural text reuses a few thousand words. When full it starts over, so it
# follows the text being served and a stream of made-up words keeps it to a few MiB.
_CACHE_WORDS = 20_000


class AsciiWordPiece:
    def __init__(self, vocab: dict[str, int], unk_id: int, max_word_chars: int, prefix: str, lowercase: bool,
                 before: list[int], after: list[int], added: list[str]) -> None:
        self.vocab = vocab
        self.unk_id = unk_id
        self.max_word_chars = max_word_chars
        self.prefix = prefix
        self.lowercase = lowercase
        self.before = before
        self.after = after
        self.added = [a.lower() for a in added]  # compared against the lowercased text: any case declines
        self._words = _WORDS[lowercase]
        self._pieces: dict[str, list[int]] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> AsciiWordPiece | None:
        """The fast path for `tokenizer`, or None when any of its stages is not one this module reproduces."""
        try:
            spec = json.loads(tokenizer.to_str())
            return cls._from_spec(spec)
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def _from_spec(cls, spec: dict[str, Any]) -> AsciiWordPiece | None:
        norm, pre, model, post = spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("model"), spec.get("post_processor")
        if not norm or norm.get("type") != "BertNormalizer" or not norm.get("clean_text"):
            return None
        if not pre or pre.get("type") != "BertPreTokenizer":
            return None
        if not model or model.get("type") != "WordPiece" or not post or post.get("type") != "TemplateProcessing":
            return None
        vocab: dict[str, int] = model["vocab"]
        if model.get("unk_token") not in vocab:
            return None
        # [special ...] $A [special ...], every type id 0: the ids around the text's.
        single = post["single"]
        where = [i for i, part in enumerate(single) if "Sequence" in part]
        if len(where) != 1 or single[where[0]]["Sequence"].get("id") != "A":
            return None
        around: list[list[int]] = [[], []]
        for i, part in enumerate(single):
            if part.get("Sequence", part.get("SpecialToken", {})).get("type_id", 0) != 0:
                return None
            if i == where[0]:
                continue
            token = part["SpecialToken"]["id"]
            around[i > where[0]] += post["special_tokens"][token]["ids"]
        added = [a["content"] for a in spec.get("added_tokens", [])]
        if not all(a and all(32 <= ord(c) <= 126 for c in a) for a in added):
            return None
        return cls(
            vocab=vocab, unk_id=vocab[model["unk_token"]], max_word_chars=int(model.get("max_input_chars_per_word", 100)),
            prefix=model.get("continuing_subword_prefix", "##"), lowercase=bool(norm.get("lowercase")),
            before=around[0], after=around[1], added=added,
        )

    def encode(self, text: str, limit: int) -> list[int] | None:
        """The ids the library gives `text` (special tokens added), or None: not covered here, or over `limit` tokens."""
        if not text.isascii() or len(text) > limit * self.max_word_chars or len(self.before) + len(self.after) > limit:
            return None
        text = text.translate(_CLEAN)
        lowered = text.lower()
        if self.lowercase:
            text = lowered
        for token in self.added:
            if token in lowered:
                return None
        ids = list(self.before)
        room = limit - len(self.after)
        for word in self._words.findall(text):
            pieces = self._pieces.get(word)
            if pieces is None:
                if len(word) > _LONG_WORD:
                    return None
                pieces = self._word(word)
            ids += pieces
            if len(ids) > room:
                return None
        ids += self.after
        return ids

    def _word(self, word: str) -> list[int]:
        """WordPiece: greedy longest match first; a word with a part that matches nothing is one unknown token."""
        if len(word) > self.max_word_chars:
            pieces = [self.unk_id]
        else:
            pieces, start, vocab = [], 0, self.vocab
            while start < len(word):
                end, found = len(word), None
                while start < end:
                    found = vocab.get(word[start:end] if start == 0 else self.prefix + word[start:end])
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    pieces = [self.unk_id]
                    break
                pieces.append(found)
                start = end
        if len(self._pieces) >= _CACHE_WORDS:
            self._pieces = {}
        self._pieces[word] = pieces
        return pieces
