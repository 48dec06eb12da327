"""Long documents, measured: does chunking find a passage that truncation cuts off, and how fast are long inputs?

The documents are real prose, long: each is the prose of one standard-library module's docstrings, in source order
(see `realtext`), kept when it runs 600–4,000 tokens. Each query is one paragraph from the second half of one
document (past the model's 256 tokens, so `truncate` never read it). Both policies embed every document; a query
is answered right when its own document ranks first. `python -m bench.long_docs` prints the table;
`make bench` puts it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import re
import sysconfig
import time
from pathlib import Path

import numpy as np

from service.runtimes.realtext import _SKIP_PARTS, _is_prose

MIN_TOKENS, MAX_TOKENS = 600, 4000


def module_documents() -> list[list[str]]:
    """Per standard-library module, its prose paragraphs in source order (modules with at least 4)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS.intersection(p.relative_to(root).parts)):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        paragraphs, seen = [], set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    text = " ".join(paragraph.split())
                    if text and _is_prose(text) and text not in seen:
                        seen.add(text)
                        paragraphs.append(text)
        if len(paragraphs) >= 4:
            docs.append(paragraphs)
    return docs


def mixed_documents(seed: int = 14) -> list[list[str]]:
    """Documents whose sections are about different things (as a long report's are): runs of 12-39 paragraphs from
    the whole standard library, shuffled (seeded), so that what a document says past its first 256 tokens is not
    what it says at its start."""
    paragraphs = [p for doc in module_documents() for p in doc]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paragraphs))
    docs, i = [], 0
    while i < len(order):
        n = int(rng.integers(12, 40))
        docs.append([paragraphs[j] for j in order[i : i + n]])
        i += n
    return docs


def _first_sentence(paragraph: str) -> str:
    return re.split(r"(?<=[.!?])\s+", paragraph, maxsplit=1)[0]


def corpus(tokenizer, documents_of=module_documents, limit: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(documents, queries, the document of each query): long documents, and as each one's query the first sentence
    of a paragraph from its second half."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    documents, queries, owner = [], [], []
    for paragraphs in documents_of():
        if limit is not None and len(documents) >= limit:
            break
        text = " ".join(paragraphs)
        n = len(tokenizer.encode(text).ids)
        if not MIN_TOKENS <= n <= MAX_TOKENS:
            continue
        # The first paragraph that starts past the model's 256 tokens and in the second half.
        seen = 0
        for p in paragraphs:
            if seen > max(300, n // 2):
                queries.append(_first_sentence(p))
                owner.append(len(documents))
                break
            seen += len(tokenizer.encode(p).ids)
        else:
            continue
        documents.append(text)
    return documents, queries, owner


async def measure(embedder, documents: list[str], queries: list[str], owner: list[int]) -> dict:
    """Top-1 accuracy of each policy, and the long documents' tokens/s under chunking."""
    from service.engine.pipeline import EmbedRequest

    out: dict = {"documents": len(documents), "queries": len(queries)}
    q = (await embedder.embed(EmbedRequest(inputs=queries, use_cache=False))).vectors
    for policy in ("truncate", "chunk"):
        t0 = time.perf_counter()
        vectors, tokens = [], 0
        for i in range(0, len(documents), 8):
            result = await embedder.embed(EmbedRequest(inputs=documents[i : i + 8], long_inputs=policy, use_cache=False))
            vectors.append(result.vectors)
            tokens += result.total_tokens
        seconds = time.perf_counter() - t0
        d = np.concatenate(vectors)
        top1 = np.argmax(q @ d.T, axis=1)
        ranks = [int((q[k] @ d.T > q[k] @ d[owner[k]]).sum()) + 1 for k in range(len(queries))]
        out[policy] = {
            "top1": float(np.mean(top1 == np.array(owner))),
            "mrr": float(np.mean([1 / r for r in ranks])),
            "tokens_per_s": tokens / seconds,
            "tokens_read": tokens,
        }
    return out


def markdown(results: dict[str, dict]) -> list[str]:
    lines = [
        "## Long documents: chunk against truncate",
        "",
        "Real prose, 600–4,000 tokens a document. *Sections*: each document is a run of paragraphs from across the "
        "standard library's docstrings (a long report's sections are about different things); *modules*: each document "
        "is the prose of one module's docstrings (one topic throughout). Each query is the first sentence of a paragraph "
        "from the second half of one document, past the model's 256 tokens; it is right when its own document ranks first.",
        "",
        "| documents | policy | right document first | MRR | tokens read | tokens/s (long inputs, in process) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in results.items():
        for policy, label in (("truncate", "truncate (first 256 tokens)"), ("chunk", "chunk (windows of 256, 32 shared)")):
            r = result[policy]
            lines.append(f"| {name} ({result['documents']}) | {label} | {r['top1']:.1%} | {r['mrr']:.3f} | {r['tokens_read']:,} | {r['tokens_per_s']:,.0f} |")
    return [*lines, ""]


async def run_all(embedder, tokenizer) -> dict[str, dict]:
    results = {}
    for name, source in (("sections", mixed_documents), ("modules", module_documents)):
        results[name] = await measure(embedder, *corpus(tokenizer, source))
    return results


async def main_async(args) -> int:
    from tokenizers import Tokenizer

    from service.config import Config, default_model_path
    from .__main__ import engine_session

    tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()  # the folder's tokenizer.json pads to 128: lengths here are the text's own
    cfg = Config().validate()
    cfg.cache.max_bytes = 0
    embedder, registry, pool = await engine_session(cfg.default_model(), cfg.limits)
    try:
        results = await run_all(embedder, tok)
    finally:
        registry.stop()
        pool.shutdown()
    print("\n".join(markdown(results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m bench.long_docs", description=__doc__.split("\n\n")[0]).parse_args(argv)
    return asyncio.run(main_async(None))


if __name__ == "__main__":
    raise SystemExit(main())
