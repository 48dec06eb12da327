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
