"""The benchmark corpus: 2,048 English-like texts of 8–128 words, the same on every machine and run.

Words are drawn from the model's own vocabulary (whole alphabetic words), in sentences with commas
and full stops, with a log-normal length distribution tuned so that the token counts match the corpus
the performance issue was measured on (p50 ≈ 43, p90 ≈ 115 tokens per text, ≈ 113k tokens).
"""

from __future__ import annotations

import numpy as np

SEED = 20261122
N_TEXTS = 2048
MIN_WORDS, MAX_WORDS = 8, 128
# log-normal word counts: median e^MU words, spread SIGMA
MU, SIGMA = 3.58, 0.80


def make_corpus(vocab: list[str], n: int = N_TEXTS, seed: int = SEED) -> list[str]:
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and len(w) >= 2)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        count = int(np.clip(round(np.exp(rng.normal(MU, SIGMA))), MIN_WORDS, MAX_WORDS))
        picked = list(rng.choice(words, count))
        sentences, k = [], 0
        while k < count:
            sentence = picked[k : k + int(rng.integers(6, 19))]
            k += len(sentence)
            if len(sentence) > 5 and rng.random() < 0.4:
                j = int(rng.integers(2, len(sentence) - 2))
                sentence[j] += ","
            sentences.append(" ".join(sentence).capitalize() + ".")
        texts.append(" ".join(sentences))
    return texts


def load(n: int = N_TEXTS) -> tuple[list[str], np.ndarray]:
    """The corpus of `n` texts and each text's token count under the default model's tokenizer: unpadded (its
    tokenizer.json pads every text to 128) and cut at 256, as the model reads it."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from service.config import default_model_path

    tok = Tokenizer.from_file(str(Path(default_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    corpus = make_corpus(list(tok.get_vocab()), n=n)
    return corpus, np.array([len(e.ids) for e in tok.encode_batch(corpus)])


def isolated(cfg):
    """A copy of `cfg` whose server, metrics and Envoy listen on free ports (the bench's own stack, beside any other)."""
    import copy

    out = copy.deepcopy(cfg)
    out.server.grpc_port = out.server.metrics_port = out.envoy.listen_port = out.envoy.admin_port = 0
    out.envoy.metrics_port = 0
    return out
