"""Vector encodings the dialects put on the wire, in one place so that every route agrees."""

from __future__ import annotations

import base64

import numpy as np


def base64_float32(vector: np.ndarray, byteorder: str = "little") -> str:
    """Raw float32 bytes, base64: little-endian for OpenAI's SDKs, big-endian (`>f4`) for HrFlow."""
    dtype = "<f4" if byteorder == "little" else ">f4"
    return base64.b64encode(np.ascontiguousarray(vector, dtype=dtype).tobytes()).decode("ascii")
