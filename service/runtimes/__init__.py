"""Runtimes: the one place a model's forward pass runs, behind one interface (`base.Runtime`).

Modes are (runtime, precision) pairs. Each reduced-precision mode is offered only because it keeps
cosine ≥ 0.999 to the fp32 reference on the benchmark corpus (tests/test_runtimes.py checks a sample;
`make bench` measures the whole corpus).

int8 (`openvino`/`int8`, never chosen by `auto`) is judged on retrieval instead (`python -m bench.int8`,
bench/INT8.md) and is listed here only once a scheme in `int8.SCHEMES` passes that bar and is `int8.CHOSEN`.
"""

from __future__ import annotations

# Every mode this server can run, in the order `make bench` compares them.
MODES: list[tuple[str, str]] = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnx", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
]
