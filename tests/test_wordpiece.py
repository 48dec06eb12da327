"""The pure-Python WordPiece fast path gives exactly the `tokenizers` library's ids, or declines.

Every text below goes through both: where the fast path answers, its ids must be the library's; where it must answer
(short plain ASCII without an added token's text) it must not decline.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from bench.corpus import make_corpus
from service.config import default_model_path
from service.engine.tokenizer import TextTokenizer
from service.engine.wordpiece import _CLEAN, _LONG_WORD, AsciiWordPiece

LIMIT = 256


@pytest.fixture(scope="module")
def library() -> Tokenizer:
    tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def quick(library) -> AsciiWordPiece:
    fast = AsciiWordPiece.of(library)
    assert fast is not None, "the default model's tokenizer should be one the fast path reproduces"
    return fast


def check(quick: AsciiWordPiece, library: Tokenizer, texts: list[str]) -> int:
    """Asserts agreement on every text; returns how many the fast path answered."""
    added = [a["content"].lower() for a in json.loads(library.to_str())["added_tokens"]]
    answered = 0
    for text in texts:
        want = library.encode(text).ids
        got = quick.encode(text, LIMIT)
        if got is not None:
            assert got == want, repr(text)
            answered += 1
        elif (text.isascii() and len(want) <= LIMIT and not any(a in text.translate(_CLEAN).lower() for a in added)
              and max(map(len, re.findall(r"[A-Za-z0-9]+", text.translate(_CLEAN))), default=0) <= _LONG_WORD):
            pytest.fail(f"declined a text it covers: {text!r}")
    return answered


def test_the_benchmark_corpus_tokenizes_exactly_as_the_library(quick, library):
    corpus = make_corpus(list(library.get_vocab()))
    assert check(quick, library, corpus) >= 0.9 * len(corpus)


def test_edge_cases_tokenize_exactly_as_the_library_or_are_declined(quick, library):
    texts = [
        "Hello, World!", "  leading and trailing  ", "tabs\tand\nnewlines\r\nhere", "a\x0bvertical\x0ctab", "nul\x00byte", "del\x7fchar",
        "x" * 99, "x" * 100, "x" * 101, "y" * 150 + " tail", "don't stop-believing... (really?) [yes] {no} <maybe> @home #1 $5 100%",
        "e-mail: someone@example.com, url: https://example.com/a_b?c=d&e=f#g", "C++ and C# and F#", "3.14159 2,718 1e-9 0x1F",
        "UPPER lower MiXeD", "ALLCAPSWORDTHATISLONG", "unaffable", "supercalifragilisticexpialidocious", "!!!", "...", "a", "1",
        "[CLS] is special", "say [MASK] please", "the [mask] in lower case", "[SEP]", "[UNK]", "[PAD] [pad]", "brackets [ CLS ]",
        "café", "naïve résumé", "日本語", "emoji 🙂", "\u00a0non-breaking", "\u2003em space",
        "word " * 253, "word " * 254, "word " * 255, "word " * 300,
    ]
    check(quick, library, texts)


def test_random_ascii_tokenizes_exactly_as_the_library(quick, library):
    rng = random.Random(7)
    vocab = [w for w in library.get_vocab() if w.isascii() and not w.startswith("[")]
    alphabet = [chr(c) for c in range(128)]
    texts = []
    for _ in range(3000):
        parts = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.random()
            if kind < 0.5:
                w = rng.choice(vocab).replace("##", "")
                parts.append(w.upper() if rng.random() < 0.2 else w)
            elif kind < 0.8:
                parts.append("".join(rng.choice(string.printable) for _ in range(rng.randint(1, 6))))
            else:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))))
        texts.append(rng.choice(["", " ", "\n"]).join(parts))
    assert check(quick, library, texts) > 2000


def test_a_tokenizer_with_stages_it_does_not_reproduce_gets_no_fast_path(library):
    spec = json.loads(library.to_str())
    for change in (
        lambda s: s.update(normalizer={"type": "NFKC"}),
        lambda s: s["normalizer"].update(clean_text=False),
        lambda s: s.update(pre_tokenizer={"type": "Whitespace"}),
        lambda s: s["post_processor"]["single"][0]["SpecialToken"].update(type_id=1),
    ):
        changed = json.loads(json.dumps(spec))
        change(changed)
        assert AsciiWordPiece.of(Tokenizer.from_str(json.dumps(changed))) is None


def test_text_tokenizer_quick_ids_are_the_embedding_paths_ids(library):
    for lowercase in (False, True):
        tt = TextTokenizer(library, LIMIT, library.get_vocab_size(), lowercase=lowercase)
        texts = ["Quick Brown Fox.", "another, shorter one"]
        quick_ids = tt.quick_ids(texts)
        assert quick_ids is not None
        for got, want in zip(quick_ids, tt.encode(texts, truncate=True)):
            assert got.dtype == np.int64 and np.array_equal(got, want.ids)
        assert tt.quick_ids(["fine", "not fine: naïve"]) is None  # one declined: the library does them all


@pytest.mark.parametrize("added", [["résumé"], ["naïve"], ["tab\there"], ["\x07bell"]])
def test_an_added_token_that_is_not_printable_ascii_means_no_fast_path(library, added):
    """The library matches an added token after normalizing both it and the text: "résumé" (normalized=true) takes
    "resume" in plain ASCII text. The fast path does not follow that, so it must not serve such a tokenizer at all."""
    tok = Tokenizer.from_str(library.to_str())
    tok.add_tokens(added)
    assert AsciiWordPiece.of(tok) is None
    if added == ["résumé"]:  # the hazard is real: plain ASCII text meets the added token
        assert tok.token_to_id("résumé") in tok.encode("my resume").ids


def test_printable_ascii_added_tokens_keep_the_fast_path_and_its_exact_answers(library):
    tok = Tokenizer.from_str(library.to_str())
    tok.add_tokens(["Zorblax", "two words"])
    fast = AsciiWordPiece.of(tok)
    assert fast is not None
    check(fast, tok, ["a zorblax here", "ZORBLAX", "two  words", "two\twords", "two words", "nothing added here"])


def test_long_words_are_declined_and_the_word_cache_stays_bounded(library):
    """A word over _LONG_WORD characters goes to the library (its greedy match is quadratic in Python), and the cache
    starts over when full rather than grow (or freeze on the first words it met)."""
    from service.engine import wordpiece

    fresh = AsciiWordPiece.of(library)
    long_word = "q" * (_LONG_WORD + 1)
    assert fresh.encode(f"short {long_word}", LIMIT) is None
    assert fresh.encode("short " + "q" * _LONG_WORD, LIMIT) == library.encode("short " + "q" * _LONG_WORD).ids
    for i in range(wordpiece._CACHE_WORDS + 10):
        fresh.encode(f"w{i}", LIMIT)
    assert 0 < len(fresh._pieces) < 100 and "w5" not in fresh._pieces and f"w{wordpiece._CACHE_WORDS + 9}" in fresh._pieces
    assert fresh.encode("w5 again", LIMIT) == library.encode("w5 again").ids


def test_a_limit_smaller_than_the_special_tokens_is_declined(quick):
    assert quick.encode("", 2) == quick.before + quick.after
    assert quick.encode("", 1) is None
