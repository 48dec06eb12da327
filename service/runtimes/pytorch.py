"""The PyTorch runtime: the fp32 reference, and bf16 for CPUs with AMX / AVX512-BF16."""

from __future__ import annotations

import numpy as np
import torch

from .base import Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, module: torch.nn.Module, precision: str = "fp32") -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the torch runtime runs fp32 or bf16, not {precision}")
        self.precision = precision
        # Casting the weights (rather than autocast) keeps the per-call cast cost out of the hot path.
        self.model = module.to(torch.bfloat16 if precision == "bf16" else torch.float32).eval()
        self.hidden_size = int(self.model.config.hidden_size)
        self._accepts_token_types = "token_type_ids" in self.model.forward.__code__.co_varnames

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None) -> np.ndarray:
        kwargs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
        if token_type_ids is not None and self._accepts_token_types:
            kwargs["token_type_ids"] = torch.from_numpy(token_type_ids)
        with torch.inference_mode():
            out = self.model(**kwargs).last_hidden_state
        return out.float().numpy()
