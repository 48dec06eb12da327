"""OpenVINO on the CPU, from the model exported at first use (see `export`).

On CPUs with AMX or AVX512-BF16 its bf16 inference precision keeps layer norms and softmax in fp32 and
measured cosine ≥ 0.99994 to fp32 on the benchmark corpus, at about twice fp32 torch's speed.

The model is compiled twice, because a small model can't keep every core busy with one batch:
- for latency, one stream over all cores: used when a batch runs alone (a lone request is as fast as possible);
- for throughput, one stream per core (OpenVINO's THROUGHPUT hint): under load the batcher runs that many
  batches at once, which measured ~1.4× the single-stream throughput here.

A lone short input (a search query: the latency that users feel) runs on a third kind of compiled model,
one per width in `lone_widths`, static at [1, width]. A server's lone request arrives after an idle gap (the
client, Envoy, gRPC), and on a shared host the caches go cold in that gap: measured here, a 45 MB matrix-vector
product takes 1.7 ms back to back and 3.2 ms after a 5 ms gap, and the dynamic model's 1 × 16 forward pass
1.6 ms back to back, 3.2-3.6 ms after a 5 ms sleep. The static model does less work per pass (no shape
inference, kernels chosen at compile time) and its advantage grows when cold: 1 × 16 1.3 ms back to back and
2.6-2.8 ms after the gap, 1 × 32 1.7 and 3.3-3.5 (dynamic 3.9-4.3). Each costs ~52 MiB of RSS. Widths 16, 24 and 32:
where the forward pass is bound by arithmetic (fp32 on AVX2: an AMD EPYC's two cores), a lone pass costs with its width
(after a 3 ms gap, p50: 1 × 16 7.7-8.1 ms, 1 × 24 8.9-9.4, 1 × 32 11.2), and a 10-16-word query is 17-24 tokens as
often as not, so the 24 saves such a query ~2 ms over padding it to 32.
"""

from __future__ import annotations

import queue
import sys

import numpy as np

from .base import Runtime
from .export import onnx_model

# `import openvino` sends a telemetry event from a forked child that it SIGTERMs after 3 s when the network hangs
# (blocked egress in a pod): the child shares the server's asyncio signal wakeup fd, so the server read that SIGTERM
# as its own and shut down (found by tests/test_pod.py). A self-hosted, offline service sends nothing: without the
# package, OpenVINO uses its no-op stub.
sys.modules.setdefault("openvino_telemetry", None)

_PRECISION_HINT = {"fp32": "f32", "bf16": "bf16"}
# int8 dot products without 16-bit saturation: on AVX2 alone, OpenVINO's int8 kernels lose fidelity (bench/INT8.md).
_INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def _model_path(folder: str, precision: str) -> tuple[str, str]:
    """(model file, inference precision hint). int8 models keep their float ops in fp32: with the bf16 hint, OpenVINO
    2026.4 on AMX ran the `ptq` model at recall@10 0.785 and cosine min 0.598 (texts of ~30 tokens worst), against
    0.940 and 0.985 with the fp32 hint, at the same speed (1.08x bf16); bench/INT8.md."""
    if precision != "int8":
        return str(onnx_model(folder)), _PRECISION_HINT[precision]
    from .int8 import int8_model

    flags = _cpu_flags()
    if not flags & set(_INT8_FLAGS):
        raise ValueError(f"the openvino runtime runs int8 only on CPUs with {', '.join(_INT8_FLAGS)} (exact int8 dot products)")
    return str(int8_model(folder)), "f32"


class OpenVinoRuntime(Runtime):
    name = "openvino"
    # Measured: with every distinct length RSS kept growing (1.07 GB after 600 shapes); padded to 16, flat at 0.63 GB.
    seq_multiple = 16
    # Widths a lone input runs at on a static-shape model (10-16 English words are 14-24 tokens with [CLS] and [SEP]).
    lone_widths = (16, 24, 32)

    def __init__(self, folder: str, precision: str, threads: int, hidden_size: int) -> None:
        if precision not in (*_PRECISION_HINT, "int8"):
            raise ValueError(f"the openvino runtime runs fp32, bf16 or int8, not {precision}")
        import openvino as ov

        self.precision = precision
        self.hidden_size = hidden_size
        path, hint = _model_path(folder, precision)
        core = ov.Core()
        model = core.read_model(path)
        common = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}
        self._latency = core.compile_model(model, "CPU", {**common, "PERFORMANCE_HINT": "LATENCY"})
        self._throughput = core.compile_model(model, "CPU", {**common, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": threads})
        self.streams = max(1, int(self._throughput.get_property("NUM_STREAMS")))
        # What OpenVINO runs, not what was asked: a bf16 hint on a CPU without bf16 units runs f32 (reported as such, so
        # that /info and the logs never call an fp32 model bf16).
        if precision == "bf16" and self._latency.get_property("INFERENCE_PRECISION_HINT") != ov.Type.bf16:
            self.precision = "fp32"
        self.inputs = [i.get_any_name() for i in self._latency.inputs]
        self._alone_request = self._latency.create_infer_request()
        self._lone_requests = {}  # (1, width) -> the infer request of a model compiled for that shape
        for width in self.lone_widths:
            static = model.clone()
            static.reshape({name: [1, width] for name in self.inputs})
            request = core.compile_model(static, "CPU", {**common, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
            request.infer({name: np.ones((1, width), dtype=np.int64) for name in self.inputs})  # its first pass sets up
            self._lone_requests[(1, width)] = request
        self._stream_requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.streams):
            self._stream_requests.put(self._throughput.create_infer_request())

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None, *, alone: bool = True
    ) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = {k: feeds[k] for k in self.inputs}
        if alone:  # the batcher runs at most one `alone` pass, and nothing beside it
            request = self._lone_requests.get(input_ids.shape, self._alone_request)
            return np.array(request.infer(feeds)[0], dtype=np.float32, copy=True)
        request = self._stream_requests.get()
        try:
            return np.array(request.infer(feeds)[0], dtype=np.float32, copy=True)
        finally:
            self._stream_requests.put(request)
