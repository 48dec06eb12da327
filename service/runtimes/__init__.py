"""Runtimes: the one place a model's forward pass runs, behind one interface (`base.Runtime`).

Modes are (runtime, precision) pairs. Each reduced-precision mode is offered only because it keeps
cosine ≥ 0.999 to the fp32 reference on the benchmark corpus (tests/test_runtimes.py checks a sample;
`make bench` measures the whole corpus).
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
