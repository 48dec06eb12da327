"""The PyTorch runtime: the fp32 reference, and bf16 autocast for CPUs with AMX / AVX512-BF16.

bf16 runs under autocast (weights stay fp32; matmuls run in bf16; layer norms and softmax in fp32):
cosine ≥ 0.99994 to fp32 on the benchmark corpus, where casting the weights themselves to bf16 measured
0.9998 — below the 0.9999 bar for a default.

bf16 runs its matmuls through oneDNN, which keeps every primitive it built (one per operation and input shape, with
its AMX scratch buffers) in a cache of 1,024 by default; with the batcher's varied shapes that cache grew a served
torch/bf16 process from 484 MiB after loading to 851-915 MiB after the benchmark corpus at 32 x 32, over the 819 MiB
line (1 GiB less 20% headroom). Bounded to 16 primitives: 758-782 MiB, at 4-5% of its tokens/s (measured through a
server, three alternating runs each: 166 against 174 texts/s).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .base import Runtime
from .threads import configure_torch

# Read by oneDNN when it builds its first primitive, so set before this runtime's first forward pass; an operator's
# own value wins.
ONEDNN_PRIMITIVE_CACHE = 16


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, path: str, precision: str = "fp32", threads: int = 0) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the torch runtime runs fp32 or bf16, not {precision}")
        from transformers import AutoModel

        if threads:
            configure_torch(threads)
        if precision == "bf16":
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE))
        self.precision = precision
        # As sentence-transformers loads it: the transformer in fp32 with the default attention.
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self._accepts_token_types = "token_type_ids" in self.model.forward.__code__.co_varnames

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None, *, alone: bool = True
    ) -> np.ndarray:
        kwargs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        if token_type_ids is not None and self._accepts_token_types:
            kwargs["token_type_ids"] = torch.from_numpy(token_type_ids)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(**kwargs).last_hidden_state
        return out.float().numpy()
