"""int8 against bf16 and fp32, judged on retrieval: `python -m bench.int8` writes bench/INT8.md.

Fidelity, on the real-prose corpus of `service.runtimes.realtext` (≈ 6,400 evaluation texts, none of them seen by
calibration or training): each mode embeds every text (the engine's tokenizer, mean pooling and normalization);
the first 500 texts are the queries, the rest the documents; recall@10 is the overlap of each query's top-10
documents under the mode with its top-10 under fp32; cosine is each text's cosine to its fp32 embedding.
Each int8 scheme is measured twice:
- native: as the server would run it on this CPU (the non-int8 ops in fp32), and, where the CPU has bf16 units,
  with the bf16 hint too (on AMX with OpenVINO 2026.4 that loses much fidelity: why the server does not use it);
- exact: OpenVINO's low-precision transformations switched off, so every FakeQuantize runs in fp32 and the
  MatMuls on exactly the int8 values: what a CPU with exact int8 dot products (AMX-INT8, AVX512-VNNI) computes.
  On a CPU without VNNI (AVX2 only), OpenVINO's int8 kernels saturate their 16-bit partial sums, and native
  fidelity is lower than exact.

Speed: every mode runs the same texts (`--speed-texts`), batched like the engine (length-sorted, ≤ 2,048 tokens
per batch, padded to a multiple of 16), on OpenVINO's throughput configuration (one stream per core, as the
server under load), side by side in one run: the modes take turns, `--reps` rounds, the order rotated each round.
The table gives the median tokens/s and the median (min–max) of each round's ratio to bf16.

`Linear FLOPs in int8` is read off the compiled model (FullyConnected nodes running u8/i8, weighted by their
weight shapes): it bounds what int8 can gain. On AMX, where the earlier measurements put GEMMs at ~65 % of bf16
time and int8 GEMMs at ~2× bf16, the expected ratio is about 1 / (0.35 + 0.65 × (1 − s/2)) for an int8 share s
(1.48× at s = 1; this model matched the three int8 variants measured on AMX within 0.05). It no longer holds: on
2026-12-06, on this project's AMX machine with OpenVINO 2026.4.1, every Linear in int8 ran at 1.08× bf16 and the
variants keeping some Linears in float at 0.97× with the float ops in bf16 and about 0.5× in fp32 (the estimate said
1.48×, 1.28×, 1.23×); read the measured column.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

sys.modules.setdefault("openvino_telemetry", None)  # as the server does: no telemetry

from service.runtimes import realtext

RECALL_BAR, MEAN_COSINE_BAR, SPEED_BAR = 0.97, 0.99, 1.5
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> tuple[str, list[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown", []
    return name, [f for f in FLAGS if f in flags]


def environment() -> dict[str, str]:
    import openvino as ov

    name, flags = cpu_info()
    env = {"cpu": name, "cores": str(os.cpu_count()), "cpu flags": " ".join(flags) or "none of " + ", ".join(FLAGS)}
    env["openvino CPU capabilities"] = " ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    env["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    env["python"] = platform.python_version()
    for pkg in ("openvino", "nncf", "torch", "transformers", "numpy", "onnx", "tokenizers"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    return env


class Corpus:
    """The tokenized evaluation texts, batched like the engine batches them."""

    def __init__(self, folder, texts: list[str], max_batch_tokens: int = 2048, seq_multiple: int = 16) -> None:
        from service.engine.tokenizer import TextTokenizer

        tok = TextTokenizer(folder.tokenizer, folder.max_seq_length, folder.vocab_size, lowercase=folder.lowercase)
        toks = tok.encode(texts, truncate=True)
        self.n, self.tokens = len(texts), sum(len(t.ids) for t in toks)
        self.lengths = np.array([len(t.ids) for t in toks])
        order = np.argsort(self.lengths, kind="stable")
        self.batches: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order):
                width = -(-int(self.lengths[order[end]]) // seq_multiple) * seq_multiple
                if width * (end - start + 1) > max_batch_tokens:
                    break
                end += 1
            idx = order[start:end]
            width = -(-int(self.lengths[idx].max()) // seq_multiple) * seq_multiple
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(toks[i].ids)] = toks[i].ids
                mask[r, : len(toks[i].ids)] = 1
            self.batches.append((idx, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}))
            start = end


def feeds_for(compiled, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: feeds[k] for k in (i.get_any_name() for i in compiled.inputs)}


def embed(compiled, corpus: Corpus, folder) -> np.ndarray:
    """Every text's normalized, pooled embedding (single stream: fidelity, not speed)."""
    from service.engine.pooling import l2_normalize, pool

    request = compiled.create_infer_request()
    out = np.zeros((corpus.n, folder.hidden_size * len(folder.pooling_modes)), np.float32)
    for idx, feeds in corpus.batches:
        hidden = np.asarray(request.infer(feeds_for(compiled, feeds))[0], np.float32)
        out[idx] = pool(hidden, feeds["attention_mask"], folder.pooling_modes)
    return l2_normalize(out)


def retrieval(reference: np.ndarray, test: np.ndarray, n_queries: int, k: int = 10) -> dict[str, float]:
    """recall@k of `test`'s neighbours against `reference`'s (queries: the first `n_queries` rows), and cosines."""
    cos = np.sum(reference * test, axis=1)

    def top(e):
        scores = e[:n_queries] @ e[n_queries:].T
        return np.argpartition(-scores, k, axis=1)[:, :k]

    want, got = top(reference), top(test)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(want, got)]))
    return {"recall": recall, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "cos_p1": float(np.percentile(cos, 1))}


def int8_share(compiled) -> float:
    """The share of Linear (FullyConnected) FLOPs that the compiled model runs in int8."""
    total = int8 = 0.0
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if "layerType" not in rt or rt["layerType"].astype(str) != "FullyConnected":
            continue
        shape = op.input(1).get_partial_shape()
        flops = float(np.prod([d.get_length() for d in shape])) if shape.is_static else 0.0
        total += flops
        if rt["runtimePrecision"].astype(str) in ("u8", "i8"):
            int8 += flops
    return int8 / total if total else 0.0


def amx_estimate(share: float) -> float:
    return 1.0 / (0.35 + 0.65 * (1 - share / 2))


def throughput(compiled, corpus: Corpus) -> float:
    """tokens/s of one pass over `corpus` with one infer request per stream, as the server runs under load."""
    import openvino as ov

    jobs = max(1, int(compiled.get_property("NUM_STREAMS")))
    queue = ov.AsyncInferQueue(compiled, jobs)
    started = time.perf_counter()
    for _, feeds in corpus.batches:
        queue.start_async(feeds_for(compiled, feeds))
    queue.wait_all()
    return corpus.tokens / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n\n")[0])
    from service.runtimes import int8 as int8mod

    default = ",".join(s for s, v in int8mod.SCHEMES.items() if v.kind == "ptq")
    parser.add_argument("--schemes", default=default, help=f"comma-separated int8 schemes, of {', '.join(int8mod.SCHEMES)} (default: {default})")
    parser.add_argument("--reps", type=int, default=5, help="rounds of the interleaved speed runs")
    parser.add_argument("--speed-texts", type=int, default=2048, help="texts per speed run (the first N evaluation texts)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--texts", type=int, default=0, help="only the first N evaluation texts (a quick check; the bar needs ≥ 5,000)")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (default: all cores)")
    parser.add_argument("--no-speed", action="store_true", help="fidelity only")
    parser.add_argument("--out", default="bench/INT8.md")
    args = parser.parse_args(argv)

    import openvino as ov

    from service.config import default_model_path
    from service.engine.folder import read_folder
    from service.runtimes.export import onnx_model

    env = environment()
    for k, v in env.items():
        print(f"{k}: {v}")
    folder = read_folder(default_model_path())
    transformer = str(folder.transformer_path)
    texts = realtext.evaluation_texts()[: args.texts or None]
    corpus = Corpus(folder, texts)
    speed_corpus = Corpus(folder, texts[: args.speed_texts])
    print(f"corpus: {corpus.n} texts ({len(realtext.all_texts())} in all, {len(realtext.calibration_texts())} kept for calibration), "
          f"{corpus.tokens:,} tokens; {args.queries} queries against {corpus.n - args.queries} documents", flush=True)

    threads = args.threads or os.cpu_count() or 1
    has_bf16 = "avx512_bf16" in env["cpu flags"] or "amx_bf16" in env["cpu flags"]
    core = ov.Core()
    fp32_model = core.read_model(str(onnx_model(transformer)))

    def compiled(model, hint: str, extra: dict | None = None, perf: str = "LATENCY"):
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": perf, **(extra or {})}
        if perf == "THROUGHPUT":
            config["NUM_STREAMS"] = threads
        return core.compile_model(model, "CPU", config)

    # (label, model, precision hint, extra config, note)
    modes = [("fp32", fp32_model, "f32", None, ""), ("bf16 (default)", fp32_model, "bf16", None, "" if has_bf16 else "no bf16 units: runs fp32")]
    schemes = [s for s in args.schemes.split(",") if s]
    for name in schemes:
        started = time.perf_counter()
        path = int8mod.int8_model(transformer, name)
        print(f"int8 {name}: {path} ({time.perf_counter() - started:.0f} s)", flush=True)
        model = core.read_model(str(path))
        modes.append((f"int8 {name}", model, "f32", None, ""))  # as the openvino runtime runs int8 (its `_model_path`)
        if has_bf16:
            modes.append((f"int8 {name}, bf16 hint", model, "bf16", None, "float ops in bf16: not served"))
        modes.append((f"int8 {name}, exact", model, "f32", {"LP_TRANSFORMS_MODE": "NO"}, "fidelity only"))

    reference = None
    rows: dict[str, dict] = {}
    for label, model, hint, extra, note in modes:
        c = compiled(model, hint, extra)
        started = time.perf_counter()
        e = embed(c, corpus, folder)
        if reference is None:
            reference = e
        row = {"note": note, **retrieval(reference, e, args.queries)}
        if label.startswith("int8") and not label.endswith(("exact", "bf16 hint")):
            row["share"] = int8_share(c)
        rows[label] = row
        print(f"{label}: recall@10 {row['recall']:.4f}, cosine mean {row['cos_mean']:.5f} min {row['cos_min']:.5f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    # The bf16-hint rows ran at the fp32-hint rows' speed on AMX (1.08x bf16 each, 2026-12-06): fidelity only.
    speed_modes = [m for m in modes if not m[0].endswith(("exact", "bf16 hint"))] if not args.no_speed else []
    if speed_modes:
        runs = [(label, compiled(model, hint, extra, "THROUGHPUT")) for label, model, hint, extra, _ in speed_modes]
        for _, c in runs:  # warm up every shape once
            throughput(c, speed_corpus)
        measured: dict[str, list[float]] = {label: [] for label, _ in runs}
        for rep in range(args.reps):
            turn = runs[rep % len(runs) :] + runs[: rep % len(runs)]
            for label, c in turn:
                measured[label].append(throughput(c, speed_corpus))
            print(f"round {rep + 1}/{args.reps}: " + ", ".join(f"{label} {measured[label][-1]:,.0f}" for label, _ in runs), flush=True)
        base = np.array(measured["bf16 (default)"])
        for label, values in measured.items():
            ratios = np.array(values) / base
            rows[label].update(tps=float(np.median(values)), ratio=float(np.median(ratios)), ratio_lo=float(ratios.min()), ratio_hi=float(ratios.max()))

    lines = report(env, corpus, speed_corpus, rows, args, int8mod.CHOSEN)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


# Schemes explored before this script's schemes were chosen (2026-11-24, on an AVX2-only AMD EPYC, 2 shared
# cores, NNCF 3.4.0, OpenVINO 2026.4.1; same corpus and metric; "exact" = int8 arithmetic without saturation).
# The AMX ratios are from earlier measurements on the AMX machine where one exists, else the FLOP estimate.
HISTORY = [
    ("NNCF PTQ, transformer, MIXED, SmoothQuant α 0.95, 300 texts (= `ptq`)", "0.9404", "0.99811", "0.98410", "1.5 measured on AMX before; 2026-12-06 on AMX: 1.03–1.08 (above)"),
    ("same, native on AVX2 (no VNNI: 16-bit saturation)", "0.9032", "0.99579", "0.98358", ""),
    ("same, SmoothQuant off", "0.8814", "0.99329", "0.97606", "≈ 1.48 (estimate)"),
    ("same, SmoothQuant α 0.5", "0.8724", "0.99181", "0.96571", "≈ 1.48 (estimate)"),
    ("same, SmoothQuant α 0.8", "0.9382", "0.99807", "0.98711", "≈ 1.48 (estimate)"),
    ("same, 1,600 calibration texts instead of 300", "0.9412", "0.99821", "0.99006", "≈ 1.48 (estimate)"),
    ("same, attention score MatMuls (QKᵀ, PV) kept in float", "0.9430", "0.99814", "0.98392", "≈ 1.46 (estimate)"),
    ("same, FFN output Linears in bf16 (= `ptq-keep-ffn-out`)", "0.9604", "0.99913", "0.98869", "1.23 measured on AMX before; 2026-12-06 on AMX: 0.97 with the float ops in bf16, 0.52 in fp32"),
    ("same, attention output + FFN output Linears in bf16", "0.9612", "0.99920", "0.99738", "≈ 1.23 (estimate)"),
    ("NNCF torch QAT (nncf.quantize on the torch model, then training)", "not finished", "", "", "its quantizers ran 11× slower than fp32 (19 s a step)"),
    ("own fake-quant distillation, no SmoothQuant, 300 steps × 16 texts, lr 3e-5 (= `qat`)", "0.8898", "0.99476", "0.98008", "≈ 1.48 (estimate); from 0.881 before training"),
    ("same, lr 1e-4", "diverged", "", "", "1 − cosine per batch rose from 0.006 to 0.017 in 60 steps"),
    # 2026-12-06, on the AMX machine (Xeon, 2 cores): no calibration at all, OpenVINO quantizes each token's
    # activations at run time. Faithful, but OpenVINO runs it only on its fp32 path; with the bf16 hint the int8
    # weights are decompressed to bf16 and multiplied there.
    ("NNCF compress_weights INT8_SYM (per channel) + OpenVINO dynamic activation quantization, groups of 32, f32 hint", "0.9658", "0.99933", "0.99815", "0.41 (measured on AMX: 16.4k against bf16's 41.5k tokens/s)"),
    ("same, bf16 hint (weights decompressed to bf16)", "0.9714", "0.99951", "0.99822", "0.74 (measured on AMX)"),
]


def report(env, corpus: Corpus, speed_corpus: Corpus, rows: dict[str, dict], args, chosen) -> list[str]:
    lines = [
        "# int8 against bf16 and fp32, judged on retrieval",
        "",
        f"Written by `python -m bench.int8` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The bar for offering",
        f"`precision: int8`: recall@10 ≥ {RECALL_BAR}, mean cosine ≥ {MEAN_COSINE_BAR} (both against fp32), and ≥ {SPEED_BAR}× the tokens/s of",
        "bf16 (the default), on a CPU with AMX. How each number is measured: the docstring of bench/int8.py.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in env.items()],
        "",
        f"Fidelity corpus: the docstrings of Python's standard library (`service/runtimes/realtext.py`), {corpus.n:,} texts, {corpus.tokens:,} tokens"
        f" (per text p50 {np.percentile(corpus.lengths, 50):.0f}, p90 {np.percentile(corpus.lengths, 90):.0f} tokens); {args.queries} queries against"
        f" the other {corpus.n - args.queries:,}. Speed: the first {speed_corpus.n:,} of them ({speed_corpus.tokens:,} tokens),"
        f" {args.reps} interleaved rounds.",
        *(
            []
            if "amx_int8" in env["cpu flags"]
            else ["", f"**This CPU has no AMX (flags: {env['cpu flags']}): its speed columns say nothing about the bar, which is set on AMX;"
                  " only the fidelity columns carry over, the exact rows most of all.**"]
        ),
        "",
        "| mode | recall@10 | cosine mean | cosine min | cosine 1st pct | Linear FLOPs in int8 | AMX estimate | tokens/s | × bf16 (min–max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows.items():
        share = f"{r['share']:.0%}" if "share" in r else ""
        estimate = f"{amx_estimate(r['share']):.2f}×" if "share" in r else ""
        speed = f"{r['tps']:,.0f} | {r['ratio']:.2f} ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f})" if "tps" in r else " | "
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {label}{note} | {r['recall']:.4f} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['cos_p1']:.5f} | {share} | {estimate} | {speed} |")
    lines += [
        "",
        "## Schemes explored before (not re-measured by this run)",
        "",
        "Same corpus and metric, int8 arithmetic exact unless said; 2026-11-24 on an AVX2-only 2-core machine, the last two",
        "rows 2026-12-06 on the AMX one (see the comments on `HISTORY` in bench/int8.py).",
        "",
        "| scheme | recall@10 | cosine mean | cosine min | × bf16 on AMX |",
        "| --- | ---: | ---: | ---: | --- |",
        *[f"| {' | '.join(row)} |" for row in HISTORY],
        "",
        f"Served by `precision: int8`: {chosen or 'none (int8 is not offered: no scheme passes the bar)'}.",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
