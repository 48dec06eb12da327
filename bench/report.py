"""Writes the benchmark's results table (bench/RESULTS.md) and plot (bench/throughput.png)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def write_report(out, plot, env, corpus_stats, rows, short, server_rss, default_mode, base_tps, peers=None,
                 stages=None, bulk=None, long_docs=None, memory=None, lone=None, cpu=None, short_vs_plain=None) -> None:
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
    if stages:
        lines += stages_section(stages)
    if short_vs_plain:
        from .cpu import short_lines

        lines += short_lines(*short_vs_plain)
    if cpu:
        from .cpu import section

        lines += section(cpu)
    if lone:
        lines += lone_section(lone)
    lines += many_clients_section(rows)
    if bulk:
        lines += bulk_section(bulk, rows)
    if memory:
        lines += memory_section(memory)
    if long_docs:
        from .long_docs import markdown

        lines += markdown(long_docs)
    if peers is not None:
        lines += peers_section(peers, rows, short, base_tps, server_rss, default_mode)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines))
    _plot(plot, rows, base_tps)


def stages_section(stages) -> list[str]:
    """Where a new short text's time goes: each layer's p50, and what it adds to the one inside it."""
    lines = [
        "## Where a short text's time goes",
        "",
        "New (uncached) 10–16-word texts, one at a time, on an idle server; the same texts on every layer, from the inside",
        "out, so what a layer adds is its p50 less the p50 of the layer inside it. The indented rows are the server's own",
        "timing headers on the REST path (`x-tokenization-time`, `x-queue-time`, `x-inference-time`, `x-compute-time`).",
        "",
        "| layer | p50 ms | p99 ms | adds (p50) ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, p50, p99, added in stages:
        lines.append(f"| {name} | {p50:.2f} | {p99:.2f} | {'' if added != added else f'{added:+.2f}'} |")
    return [*lines, ""]


def lone_section(lone) -> list[str]:
    """A lone short text's forward pass under each runtime option (bench/lone.py)."""
    lines = [
        "## A lone short text's forward pass: the options",
        "",
        "The runtime alone on one text padded to 16 or 32 tokens (what a 10–16-word text becomes), each option in a",
        "process of its own, twice in alternating order (medians of the two). *Back to back*: one pass after another.",
        "*After 3 ms idle*: each pass after a 3 ms sleep, as a served request comes after the client, Envoy and gRPC ran;",
        "on this shared host the caches go cold in that gap, so this is the forward pass a served short text gets. *Adds*:",
        "resident memory after compiling its model(s) and running, over the process with the runtime imported (the",
        "runtime's CPU plugin included). *Cosine*: its mean-pooled output against the default's, on the same ids.",
        "",
        "| option | shape | back to back p50 ms | p99 ms | after 3 ms idle p50 ms | adds MiB | cosine to the default |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in lone:
        lines.append(f"| {r['option']} | 1 × {r['shape']} | {r['p50']:.2f} | {r['p99']:.2f} | {r.get('idle_p50', float('nan')):.2f} | {r['mib']:.0f} "
                     f"| {r['cosine']:.6f} |")
    return [*lines, ""]


def many_clients_section(rows) -> list[str]:
    """Many clients sending one text each, against the batched 32 × 32, both through Envoy REST."""
    rest = {(r.concurrency, r.per_request): r for r in rows if r.group == "serving" and r.name.startswith("REST")}
    batched = rest.get((32, 32))
    if not batched:
        return []
    lines = ["## Many clients, one text each (REST through Envoy)", "",
             "| clients | tokens/s | share of 32 × 32 | p50 ms | p99 ms |", "| ---: | ---: | ---: | ---: | ---: |"]
    for c in (1, 8, 32, 128):
        r = rest.get((c, 1))
        if r:
            lines.append(f"| {c} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / batched.tokens_per_s:.0%} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |")
    return [*lines, ""]


def bulk_section(bulk, rows) -> list[str]:
    engine = next((r for r in rows if r.group == "serving" and r.name == "engine in process" and (r.concurrency, r.per_request) == (32, 32)), None)
    ref = bulk.get("reference")
    lines = [
        "## Bulk ingestion: one client, one stream",
        "",
        f"{bulk['texts']:,} texts ({bulk['tokens']:,} tokens) streamed over one `tei.v1.Embed/EmbedStream` call through Envoy, one",
        f"text a message, 2048 in flight (the server takes ~1,150, flow control holds the rest): {bulk['answers']:,} answers in {bulk['seconds']:.1f} s, **{bulk['tokens_per_s']:,.0f} tokens/s**.",
        "",
    ]
    if ref:
        lines += [
            f"Its reference is the engine in process at 32 × 32 on the first {ref['texts']:,} of the same texts, run right before and right after",
            "the stream, so that the host's drift between runs minutes apart (the last row) does not enter the ratio.", "",
            "| | tokens/s | stream's share |", "| --- | ---: | ---: |",
            f"| engine in process, right before | {ref['before']['tokens_per_s']:,.0f} | {bulk['tokens_per_s'] / ref['before']['tokens_per_s']:.0%} |",
            f"| engine in process, right after | {ref['after']['tokens_per_s']:,.0f} | {bulk['tokens_per_s'] / ref['after']['tokens_per_s']:.0%} |",
            f"| **both together** | {ref['tokens_per_s']:,.0f} | **{bulk['tokens_per_s'] / ref['tokens_per_s']:.0%}** |",
        ]
        if engine:
            lines.append(f"| the serving grid's 32 × 32 row, minutes earlier ({engine.tokens_per_s / ref['tokens_per_s'] - 1:+.0%} against both together) "
                         f"| {engine.tokens_per_s:,.0f} | {bulk['tokens_per_s'] / engine.tokens_per_s:.0%} |")
        lines.append("")
    elif engine:
        lines += [f"{bulk['tokens_per_s'] / engine.tokens_per_s:.0%} of the engine in process at 32 × 32 ({engine.tokens_per_s:,.0f} tokens/s).", ""]
    cpu = bulk.get("cpu_us_per_text")
    if cpu and ref:
        engine_cpu = (ref["before"]["cpu_us_per_text"] + ref["after"]["cpu_us_per_text"]) / 2
        total = sum(cpu.values())
        lines += [
            "Where a streamed text's cost goes: CPU time (all threads) per text, on the cores everything here shares. The",
            "client is this bench's process; a real client runs elsewhere, but here its CPU is taken from the server's.", "",
            "| process | CPU µs per text | share |", "| --- | ---: | ---: |",
            *[f"| {name} | {v:,.0f} | {v / total:.1%} |" for name, v in cpu.items()],
            f"| all of the stream | {total:,.0f} | 100% |",
            f"| the engine in process (reference) | {engine_cpu:,.0f} | |",
            "",
        ]
        from .cpu import bulk_lines

        lines += bulk_lines(bulk)
    return lines


def memory_section(memory) -> list[str]:
    lines = ["## Memory: a server in each mode", "",
             "Peak RSS (VmHWM) of a server started in that mode after serving the corpus over native gRPC at 32 × 32; the",
             "second column adds its offload worker (parses large bodies off the event loop) and multiprocessing's tracker.", "",
             "| mode | server MiB | with its workers MiB |", "| --- | ---: | ---: |"]
    lines += [f"| {mode} | {server:.0f} | {total:.0f} |" for mode, server, total in memory]
    return [*lines, ""]


def peers_section(peers, rows, short, base_tps, server_rss=None, default_mode=None) -> list[str]:
    """The "Peers" section: fastembed and Infinity (bench/peers.py) beside ours, same corpus and run."""
    mode = f"{default_mode[0]}/{default_mode[1]}" if default_mode else "default mode"
    lines = [
        "## Peers (`make bench PEERS=1`)",
        "",
        "fastembed and Infinity on the same corpus in the same run, each in its own virtual environment, offline, on the same",
        "weights (the ONNX-based ones on our ONNX export of them); see bench/peers.py. c = concurrent callers, n = texts",
        "per call. fastembed is a library (one caller, `embed(batch_size=n)`); Infinity in process is `AsyncEmbeddingEngine` with c",
        "concurrent `embed` calls; Infinity's REST server is driven by the same client as ours, directly (ours goes through Envoy).",
        "Peak RSS: the peer's process (for REST, its server); for ours, the server after every serving run. Our cosine is the",
        "default mode's, measured in process above.",
        "",
        "| who | path | c | n | tokens/s | × baseline | p50 ms | p99 ms | cosine to fp32: min | mean | peak RSS MiB | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.group == "baseline":
            lines.append(f"| baseline | {r.name} | 1 | 32 | {r.tokens_per_s:,.0f} | 1.00 | | | 1 | 1 | | |")
    default = next((r for r in rows if r.group == "runtime" and r.extra.get("default")), None)
    cos = f"{default.extra['cos_min']:.6f} | {default.extra['cos_mean']:.6f}" if default else " | "
    for r in rows:
        if r.group == "serving" and (r.name == "engine in process" or r.name.startswith("REST")) and (r.concurrency, r.per_request) in ((32, 32), (32, 1)):
            rss = f"{server_rss:.0f}" if server_rss and r.name.startswith("REST") else ""
            lines.append(f"| **ours** | {r.name}, {mode} | {r.concurrency} | {r.per_request} | {r.tokens_per_s:,.0f} | {r.ratio:.2f} | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {cos} | {rss} | {r.errors} |")
    for r in peers.rows:
        cos = f"{r.cos_min:.6f} | {r.cos_mean:.6f}" if r.cos_min is not None else "| "
        lat = f"{r.p50_ms:.0f} | {r.p99_ms:.0f}" if r.p50_ms else " | "
        lines.append(f"| {r.peer} | {r.path} | {r.concurrency} | {r.per_request} | {r.tokens_per_s:,.0f} | {r.ratio:.2f} | {lat} | {cos} | {r.rss_mib:.0f} | {r.errors} |")
    lines += ["", "A single short text (14 tokens), concurrency 1:", "", "| who | path | p50 ms | p99 ms |", "| --- | --- | ---: | ---: |"]
    lines += [f"| **ours** | {name} | {p50:.2f} | {p99:.2f} |" for name, (p50, p99) in short.items()]
    for name, (p50, p99) in peers.short.items():
        who, _, path = name.partition(", ")
        lines.append(f"| {who} | {path} | {p50:.2f} | {p99:.2f} |")
    if peers.versions:
        lines += ["", "Peer versions: " + "; ".join(f"{peer}: " + ", ".join(f"{k} {v}" for k, v in vs.items()) for peer, vs in peers.versions.items()) + "."]
    if peers.notes:
        lines += ["", *[f"- {note.splitlines()[0]}" for note in peers.notes]]
    return lines + [""]


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
