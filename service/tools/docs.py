"""Generates the configuration and metrics references (docs/configuration.md, docs/operations.md) from the code
(`make docs`, `python -m service.tools.docs`).

The configuration table comes from the dataclasses in service/config.py (names, types, defaults) and the
comment lines written above each field; the metrics table from the metric objects themselves. A test
checks the docs hold exactly what this writes, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

from .. import config as config_mod
from .. import metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Each generated reference and the page it lives in.
PAGES = {"config-reference": DOCS / "configuration.md", "metrics-reference": DOCS / "operations.md"}
SECTIONS = [
    ("server", config_mod.ServerConfig),
    ("envoy", config_mod.EnvoyConfig),
    ("limits", config_mod.LimitsConfig),
    ("auth", config_mod.AuthConfig),
    ("cache", config_mod.CacheConfig),
    ("tracing", config_mod.TracingConfig),
    ("dialects", config_mod.DialectsConfig),
    ("models[]", config_mod.ModelConfig),
    ("providers[]", config_mod.ProviderConfig),
]
# Lists of sections come from the environment whole, as YAML (`EMBED__MODELS='[{id: a, path: /m}]'`).
LIST_ENV = {"models[]": "MODELS", "providers[]": "PROVIDERS"}


def _field_comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
        elif m := re.match(r"(\w+): ", stripped):
            comments[m.group(1)] = " ".join(pending)
            pending = []
        else:
            pending = []
    return comments


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, str) and not value:
        return '""'
    return f"`{value}`"


def config_reference() -> str:
    rows = ["| key | default | environment | what |", "| --- | --- | --- | --- |"]
    for section, cls in SECTIONS:
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            env = (f"in `{config_mod.ENV_PREFIX}{LIST_ENV[section]}`" if section in LIST_ENV
                   else f"`{config_mod.ENV_PREFIX}{section.upper()}__{f.name.upper()}`")
            default = _default(f) if not (section == "models[]" and f.name == "id") else f"`{config_mod.DEFAULT_MODEL_ID}`"
            note = notes.get(f.name, "").replace("|", "\\|")  # a `|` in a comment would end the cell
            rows.append(f"| `{section}.{f.name}` | {default} | {env} | {note} |")
    return "\n".join(rows)


def metrics_reference() -> str:
    rows = ["| metric | type | labels | what |", "| --- | --- | --- | --- |"]
    for m in (metrics.REQUESTS, metrics.REQUEST_SECONDS, metrics.STAGE_SECONDS, metrics.INPUTS, metrics.TOKENS,
              metrics.BATCH_SIZE, metrics.BATCH_TOKENS, metrics.BATCH_SECONDS):
        name = m._name + ("_total" if m._type == "counter" else "")
        rows.append(f"| `{name}` | {m._type} | {', '.join(m._labelnames)} | {m._documentation} |")
    for name, kind, labels, doc in metrics.STATE_METRICS:
        rows.append(f"| `{name}` | {kind} | {labels} | {doc} |")
    return "\n".join(rows)


# -- figures: numbers in the docs, each read from the committed results it comes from ------------------------------

BENCH = ROOT / "bench"


def _tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Every table of a results page, by the heading above it (the first table under a heading), rows as dicts."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, lines = "", md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("# ").strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]) and heading not in out:
            cols: list[str] = []
            for c in (c.strip() for c in line.strip("|").split("|")):  # a repeated column name gets " 2", " 3"
                cols.append(c if c not in cols else f"{c} {sum(x.split(' ')[0] == c.split(' ')[0] for x in cols) + 1}")
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(cols, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            out[heading] = rows
            continue
        i += 1
    return out


def _row(rows: list[dict[str, str]], **match: str) -> dict[str, str]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows match {match}")
    return found[0]


def figures() -> dict[str, str]:
    """Every figure the docs quote, from bench/RESULTS.md, bench/LOAD.md and bench/MPNET.md as committed."""
    results = (BENCH / "RESULTS.md").read_text()
    t = _tables(results)
    runtimes = t["Runtimes (engine in process, concurrency 32, 32 texts per request)"]
    serving = next(rows for title, rows in t.items() if title.startswith("Serving the default mode ("))
    single = t["A single short text (14 tokens), concurrency 1"]
    peers = t.get("Peers (`make bench PEERS=1`)", [])
    machine = dict(re.findall(r"(?m)^\| (cpu|cores) \| (.+?) \|$", results))

    def served(path: str, c: str, n: str) -> str:
        r = _row(serving, path=path, c=c, n=n)
        return f"{r['tokens/s']} ({r['× baseline']}×)"

    rest = "REST via Envoy (OpenAI, base64)"
    share = re.search(r"- c=32, n=32: (\d+)%", results)
    fig = {
        "results.date": re.search(r"Written by `make bench` on ([^.]+)\.", results).group(1),
        "results.cpu": f"{machine['cpu']}, {machine['cores']} cores",
        "results.baseline": _row(runtimes, **{"runtime / precision": "**baseline**: SentenceTransformer.encode, batch 32, fp32"})["tokens/s"],
        "results.runtime_default": next(f"{r['runtime / precision'].removeprefix('engine, ').removesuffix(' (default)')}: {r['tokens/s']} ({r['× baseline']}×)"
                                        for r in runtimes if r["runtime / precision"].endswith("(default)")),
        "results.engine_32x32": served("engine in process", "32", "32"),
        "results.rest_32x32": served(rest, "32", "32") + (f", {share.group(1)} % of in process" if share else ""),
        "results.rest_32x32_tokens": _row(serving, path=rest, c="32", n="32")["tokens/s"],
        "results.rest_32x1": served(rest, "32", "1"),
        "results.rest_128x1": served(rest, "128", "1"),
        "results.single_text": " / ".join(f"{float(_row(single, path=p)['p50 ms']):.1f} ({float(_row(single, path=p)['p99 ms']):.1f})"
                                          for p in ("engine in process", "gRPC direct", rest)),
        "results.rss": re.search(r"Server peak RSS \(VmHWM\) after all serving runs: \*\*([\d,]+ MiB)\*\*", results).group(1),
    }
    infinity = [r for r in peers if r.get("who") == "Infinity" and r.get("c") == "32" and r.get("n") == "32" and r.get("path", "").startswith("REST") and "torch fp32" in r.get("path", "")]
    if infinity:
        fig["results.infinity_rest_32x32"] = f"{infinity[0]['× baseline']}×"
    load = (BENCH / "LOAD.md").read_text()
    runs = _tables(load)
    table = next(rows for rows in runs.values() if rows and "requests" in rows[0])
    fig["load.date"] = re.search(r"Written by `make load` on ([^:]+:\d\d UTC)", load).group(1)
    fig["load.requests"] = " + ".join(f"{int(r['requests']):,}" for r in table)
    fig["load.streamed"] = f"{sum(int(r['streamed texts']) for r in table):,}"
    fig["load.p99"] = " / ".join(f"{int(r['p99 ms']):,} ms" for r in table)
    fig["load.rss"] = f"{table[0]['server RSS before → after'].split(' →')[0]} → {table[-1]['server RSS before → after'].split('→ ')[-1]}"
    mpnet = (BENCH / "MPNET.md").read_text() if (BENCH / "MPNET.md").exists() else ""
    if mpnet:
        fig["mpnet.date"] = re.search(r"Written by `make bench-mpnet` on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)", mpnet).group(1)
        fig["mpnet.machine"] = re.search(r"Machine: ([^;]+);", mpnet).group(1)
        rows = next(rows for rows in _tables(mpnet).values() if rows and "model" in rows[0])
        for r in rows:
            name = "minilm" if "MiniLM" in r["model"] else "mpnet" if "mpnet" in r["model"] else None
            if name:
                fig[f"mpnet.{name}"] = f"{r['× baseline']}× ({r['served tokens/s']} against {r['baseline tokens/s']} tokens/s)"
    # Issue 29's three per-CPU targets, in the same run (absent from a run older than them).
    heads = re.search(r"(?m)^## Per server CPU.*\n(?:.*\n)*?[|] [|] (.+?) [|]$", results)
    ratios = re.search(r"(?m)^[|] [*][*]ratio[*][*] [|] (.+?) [|]$", results)
    if heads and ratios:
        fig["cpu.lone"] = " / ".join(f"{r}× ({h})" for h, r in zip(heads.group(1).split(" | ")[1:], ratios.group(1).replace("*", "").split(" | ")[1:]))
    short = re.search(r"[*][*]([\d.]+)×[*][*] plain encode at p50 \(target ≤ 0.35×\), p99 ([\d.]+)× p50", results)
    if short:
        fig["cpu.short"] = f"{short.group(1)}× plain encode at p50, p99 {short.group(2)}× p50"
    bulk = re.search(r"[*][*]([\d.]+)×[*][*] \(target ≤ 1.03×\)", results)
    if bulk:
        fig["cpu.bulk"] = f"{bulk.group(1)}×"
    return fig


FIGURE = re.compile(r"<!-- fig: ([\w.]+) -->(.*?)<!-- /fig -->", re.S)


def render_figures(text: str) -> str:
    """Every `<!-- fig: NAME -->…<!-- /fig -->` with NAME's value from the results (an unknown NAME stops it)."""
    values = figures()

    def put(m: re.Match) -> str:
        if m.group(1) not in values:
            raise SystemExit(f"unknown figure {m.group(1)!r}; known: {', '.join(sorted(values))}")
        return f"<!-- fig: {m.group(1)} -->{values[m.group(1)]}<!-- /fig -->"

    return FIGURE.sub(put, text)


def references() -> dict[str, str]:
    return {"config-reference": config_reference(), "metrics-reference": metrics_reference()}


def render(text: str, tags: list[str] | None = None) -> str:
    """`text` with each generated reference (of `tags`: those its page holds) written between its markers."""
    bodies = references()
    for tag in tags if tags is not None else [t for t in bodies if f"<!-- {t}:start -->" in text]:
        start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
        if start not in text:
            raise SystemExit(f"the page lacks the {start} … {end} markers")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{bodies[tag]}\n{end}{after}"
    return text


def pages() -> list[Path]:
    """Every page that may quote a figure: the README and docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def main() -> int:
    for tag, page in PAGES.items():
        page.write_text(render(page.read_text(), [tag]))
        print(f"{page.relative_to(ROOT)}: {tag} regenerated")
    for page in pages():
        text = page.read_text()
        if FIGURE.search(text):
            page.write_text(render_figures(text))
            print(f"{page.relative_to(ROOT)}: {len(FIGURE.findall(text))} figures from bench/ regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
