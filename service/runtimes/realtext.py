"""A corpus of real English prose, built offline and deterministically: the docstrings of Python's standard library.

Why this source: it is human-written technical prose (not generated), it is on every machine that runs the
service (the interpreter's own `Lib/` folder; nothing to download or install), it is fixed by the Python
version (3.11.7 here, pinned by the project's machines), and it is not the generated benchmark corpus
(`bench.corpus`). Its topics cluster (files, sockets, parsing, dates...), with many near-paraphrases
("Return the ...", "Create a new ..."), which makes nearest-neighbour rankings fragile: a demanding test of
whether a reduced-precision mode keeps the same neighbours.

How: every `.py` file of the standard library (tests, idlelib and site-packages left out) is parsed with `ast`
(never imported), each module, class and function docstring is split into paragraphs, whitespace is collapsed,
and a paragraph is kept if it reads as prose: 8–150 words, starts with a capital letter, ≥ 85 % letters and
spaces, no doctest (`>>>`) or reST literal (`::`). Duplicates are dropped and the rest sorted, then split by a
hash of the text (stable across runs and machines) into an evaluation part and a calibration part, so a
quantizer calibrated on `calibration_texts()` never sees the texts it is judged on.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

MIN_WORDS, MAX_WORDS = 8, 150
# One text in CALIBRATION_SHARE goes to the calibration part (by hash), the rest to the evaluation part.
CALIBRATION_SHARE = 5
_SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def _is_prose(text: str) -> bool:
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if ">>>" in text or "::" in text or not text[0].isupper():
        return False
    return sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.85


@lru_cache(maxsize=1)
def all_texts() -> tuple[str, ...]:
    """Every prose paragraph of the standard library's docstrings, deduplicated and sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.relative_to(root).parts))
    found: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for paragraph in re.split(r"\n\s*\n", doc or ""):
                    text = " ".join(paragraph.split())
                    if text and _is_prose(text):
                        found.add(text)
    return tuple(sorted(found))


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _ordered(texts) -> list[str]:
    """A fixed pseudo-random order (by hash), the same on every machine."""
    return sorted(texts, key=lambda t: (hashlib.sha256(b"order:" + t.encode()).digest(), t))


def evaluation_texts() -> list[str]:
    """The texts fidelity is judged on (≈ 6,400 with Python 3.11), in a fixed shuffled order."""
    return _ordered(t for t in all_texts() if _bucket(t) % CALIBRATION_SHARE)


def calibration_texts() -> list[str]:
    """The texts a quantizer may calibrate on (≈ 1,600), disjoint from `evaluation_texts()`."""
    return _ordered(t for t in all_texts() if _bucket(t) % CALIBRATION_SHARE == 0)


def retrieval_split(n_queries: int = 500, n_texts: int | None = None) -> tuple[list[str], list[str]]:
    """(queries, documents): the first `n_queries` evaluation texts against the rest (or the next `n_texts`)."""
    texts = evaluation_texts()
    if n_texts is not None:
        texts = texts[:n_texts]
    return texts[:n_queries], texts[n_queries:]


if __name__ == "__main__":
    ev, cal = evaluation_texts(), calibration_texts()
    words = sorted(len(t.split()) for t in ev)
    print(f"{len(all_texts())} texts: {len(ev)} evaluation, {len(cal)} calibration; words p50 {words[len(words) // 2]}, p90 {words[len(words) * 9 // 10]}")
    for t in ev[:5]:
        print("-", t)
