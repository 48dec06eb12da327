"""What many test files share: comparing vectors, posting JSON to the stack."""

from __future__ import annotations

import numpy as np
import requests


def close(a, b, tol: float = 1e-5) -> None:
    """Same shape, and no component further apart than `tol` (fp32: the service's fidelity bar)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= tol, np.abs(a - b).max()


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def post(stack, path: str, payload, **kw) -> requests.Response:
    return requests.post(stack.http_url + path, json=payload, timeout=60, **kw)
