"""Pooling and the post-transformer modules of a sentence-transformers folder, in numpy.

Pooling lives here rather than in a runtime so that torch, ONNX and every precision share one
implementation, and the token embeddings stay available for callers who want them (HrFlow's
`return_sequences`). Inputs are always right-padded by the batcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


@dataclass(frozen=True)
class Dense:
    """A sentence-transformers Dense layer (weight [out, in], bias, activation)."""

    weight: np.ndarray
    bias: np.ndarray | None
    activation: str  # "identity" | "tanh"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return np.tanh(y) if self.activation == "tanh" else y


def pool(
    token_embeddings: np.ndarray, attention_mask: np.ndarray, modes: tuple[str, ...], prompt_lengths: np.ndarray | None = None
) -> np.ndarray:
    """[B, L, H] float32 and [B, L] mask → [B, H * len(modes)], as sentence-transformers' Pooling does."""
    mask = attention_mask.astype(np.float32)
    if prompt_lengths is not None and prompt_lengths.any():
        # include_prompt=False: the prompt's tokens (after the leading special token) do not count.
        positions = np.arange(mask.shape[1])[None, :]
        mask = np.where(positions < prompt_lengths[:, None], 0.0, mask).astype(np.float32)
    out = []
    for mode in modes:
        if mode == "cls":
            first = attention_mask.argmax(axis=1)
            out.append(token_embeddings[np.arange(len(first)), first])
        elif mode == "max":
            masked = np.where(mask[:, :, None] > 0, token_embeddings, -np.inf)
            out.append(masked.max(axis=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            summed = np.einsum("blh,bl->bh", token_embeddings, mask)
            count = np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
            out.append(summed / (count if mode == "mean" else np.sqrt(count)))
        elif mode == "weightedmean":
            weights = mask * np.arange(1, mask.shape[1] + 1, dtype=np.float32)[None, :]
            summed = np.einsum("blh,bl->bh", token_embeddings, weights)
            out.append(summed / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None))
        elif mode == "lasttoken":
            last = attention_mask.shape[1] - 1 - attention_mask[:, ::-1].argmax(axis=1)
            out.append(token_embeddings[np.arange(len(last)), last])
        else:  # refused when the model loads; kept as a guard
            raise ValueError(f"unknown pooling mode {mode}")
    return (out[0] if len(out) == 1 else np.concatenate(out, axis=1)).astype(np.float32, copy=False)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)
