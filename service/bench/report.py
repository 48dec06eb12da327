"""Writes the benchmark's results table (bench/RESULTS.md) and plot (bench/throughput.png)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def write_report(out, plot, env, corpus_stats, rows, short, server_rss, default_mode, base_tps) -> None:
    n_texts, tokens, lengths = corpus_stats
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Ratios are tokens/s against the baseline,",
        "`SentenceTransformer.encode(batch_size=32)` in fp32, measured in the same run. Cache off: every text is computed.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in env.items()],
        "",
        f"Corpus: {n_texts} generated English-like texts (seeded), {tokens:,} tokens; per text p50 {np.percentile(lengths, 50):.0f},"
        f" p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()} tokens.",
        "",
        "## Runtimes (engine in process, concurrency 32, 32 texts per request)",
        "",
        "| runtime / precision | tokens/s | texts/s | × baseline | cosine to fp32: min | mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.group == "baseline":
            lines.append(f"| **baseline**: {r.name} | {r.tokens_per_s:,.0f} | {r.texts_per_s:,.0f} | 1.00 | 1 | 1 |")
    for r in rows:
        if r.group == "runtime":
            mark = " (default)" if r.extra.get("default") else ""
            lines.append(
                f"| {r.name}{mark} | {r.tokens_per_s:,.0f} | {r.texts_per_s:,.0f} | {r.ratio:.2f} | {r.extra['cos_min']:.6f} | {r.extra['cos_mean']:.6f} |"
            )
    lines += [
        "",
        f"## Serving the default mode ({default_mode[0]}/{default_mode[1]})",
        "",
        "c = concurrent clients, n = texts per request.",
        "",
        "| path | c | n | tokens/s | texts/s | p50 ms | p99 ms | × baseline | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.group == "serving":
            lines.append(
                f"| {r.name} | {r.concurrency} | {r.per_request} | {r.tokens_per_s:,.0f} | {r.texts_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.ratio:.2f} | {r.errors} |"
            )
    engine = {(r.concurrency, r.per_request): r.tokens_per_s for r in rows if r.name == "engine in process"}
    rest = {(r.concurrency, r.per_request): r.tokens_per_s for r in rows if r.name.startswith("REST")}
    lines += ["", "REST through Envoy as a share of the in-process engine (serving overhead):", ""]
    lines += [f"- c={c}, n={n}: {rest[(c, n)] / engine[(c, n)]:.0%}" for (c, n) in engine if (c, n) in rest]
    lines += ["", "## A single short text (14 tokens), concurrency 1", "", "| path | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {p50:.2f} | {p99:.2f} |" for name, (p50, p99) in short.items()]
    lines += ["", f"Server peak RSS (VmHWM) after all serving runs: **{server_rss:.0f} MiB**.", ""]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines))
    _plot(plot, rows, base_tps)


def _plot(path, rows, base_tps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    serving = [r for r in rows if r.group == "serving"]
    names = list(dict.fromkeys(r.name for r in serving))
    combos = list(dict.fromkeys((r.concurrency, r.per_request) for r in serving))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    width = 0.8 / len(names)
    x = np.arange(len(combos))
    for i, name in enumerate(names):
        vals = [next((r.tokens_per_s for r in serving if r.name == name and (r.concurrency, r.per_request) == k), 0) for k in combos]
        ax.bar(x + i * width, vals, width, label=name)
    ax.axhline(base_tps, color="black", linestyle="--", linewidth=1, label="baseline (ST encode, batch 32)")
    ax.set_xticks(x + width * (len(names) - 1) / 2, [f"c={c}\nn={n}" for c, n in combos])
    ax.set_ylabel("tokens/s")
    ax.set_title("Default mode, by path, concurrency (c) and texts per request (n)")
    ax.legend(fontsize=8)
    ax = axes[1]
    runtime_rows = [r for r in rows if r.group in ("baseline", "runtime")]
    ax.barh([r.name.replace("engine, ", "") if r.group == "runtime" else "baseline" for r in runtime_rows], [r.tokens_per_s for r in runtime_rows], color="tab:gray")
    ax.set_xlabel("tokens/s (c=32, n=32, in process)")
    ax.set_title("Runtimes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
