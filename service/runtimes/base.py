"""The interface every runtime implements, so the engine never knows which one it drives."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runtime(ABC):
    """Runs the transformer of one model: padded token ids in, per-token embeddings out.

    Pooling, normalization and everything after stay in the engine, so a runtime is only the
    expensive part and each runtime is checked against the same fp32 reference.
    """

    #: e.g. "torch", "onnx"
    name: str
    #: "fp32", "bf16" or "int8"
    precision: str
    #: width of the token embeddings
    hidden_size: int
    #: forward passes that may run at once (one batcher thread each); > 1 for runtimes with streams
    streams: int = 1
    #: pad the sequence length of a batch up to a multiple of this: runtimes that keep state per input shape
    #: (OpenVINO's kernel and memory caches grew past 1 GiB with every distinct length) see few shapes
    seq_multiple: int = 1
    #: widths a lone input (one input, `alone`) runs at on a model compiled for [1, width]: the batcher pads such an
    #: input to the narrowest that holds it, instead of to `seq_multiple`
    lone_widths: tuple[int, ...] = ()

    @abstractmethod
    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None, *, alone: bool = True
    ) -> np.ndarray:
        """[batch, seq] int64 arrays in; [batch, seq, hidden] float32 token embeddings out.

        `alone`: no other forward pass runs now, so this one may use every core (a lone request's
        latency); otherwise it runs on one stream beside the others (throughput under load).
        """

    def describe(self) -> str:
        return f"{self.name}/{self.precision}"
