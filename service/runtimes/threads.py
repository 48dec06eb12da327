"""Thread counts, set once for the process, so tokenizer, runtime and gRPC threads don't oversubscribe.

The runtime gets `n` intra-op threads (all cores by default: the forward pass is the work); its inter-op
pool is 1; tokenization runs on a small pool with the tokenizers library's own parallelism off; the
gRPC server is one asyncio thread.
"""

from __future__ import annotations

import os

_configured: int | None = None


def inference_threads(requested: int = 0) -> int:
    return requested if requested > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def configure(requested: int = 0) -> int:
    """Applies the thread settings (idempotent); returns the runtime's thread count."""
    global _configured
    n = inference_threads(requested)
    if _configured == n:
        return n
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    _configured = n
    return n


def configure_torch(n: int) -> None:
    """torch's pools, set when (and only if) the torch runtime is used: a server on OpenVINO never imports torch."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; already set is fine
        pass
