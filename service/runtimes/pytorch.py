"""The PyTorch runtime: the fp32 reference, and bf16 autocast for CPUs with AMX / AVX512-BF16.

bf16 runs under autocast (weights stay fp32; matmuls run in bf16; layer norms and softmax in fp32):
cosine ≥ 0.99994 to fp32 on the benchmark corpus, where casting the weights themselves to bf16 measured
0.9998 — below the 0.9999 bar for a default. A server that runs bf16 here bounds oneDNN's primitive cache at
start (`threads.bound_onednn_cache`): its default grew a served process past the memory target.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Runtime
from .threads import configure_torch


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, path: str, precision: str = "fp32", threads: int = 0) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the torch runtime runs fp32 or bf16, not {precision}")
        from transformers import AutoModel

        if threads:
            configure_torch(threads)
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
