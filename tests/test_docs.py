"""The docs' configuration and metrics references are what the code says (they cannot drift)."""

from __future__ import annotations

from pathlib import Path

from service.tools import docs

ROOT = Path(__file__).resolve().parents[1]


def test_references_are_current():
    for tag, page in docs.PAGES.items():
        text = page.read_text()
        assert docs.render(text, [tag]) == text, f"{page.name}: run make docs"


def test_every_config_key_is_documented():
    table = docs.config_reference()
    for line in table.splitlines()[2:]:
        assert line.rstrip().endswith("|") and not line.rstrip().endswith("|  |"), f"undocumented: {line}"


def test_licence_and_notice():
    """Issue 28.4: the project's licence, and the notice for what it carries of others' (TEI's tei.proto, Apache-2.0)."""
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    notice = (ROOT / "NOTICE").read_text()
    assert "proto/tei/v1/tei.proto" in notice and "Copyright 2022 Hugging Face" in notice and "v1.9.3" in notice


def test_figures_are_the_committed_results():
    """Issue 28.3: every number the docs quote from a benchmark is read from bench/ by `make docs`; one that disagrees
    with its source (an edited doc, or results committed without `make docs`) fails here."""
    figures = docs.figures()
    used = set()
    for page in docs.pages():
        text = page.read_text()
        used |= {name for name, _ in docs.FIGURE.findall(text)}
        assert docs.render_figures(text) == text, f"{page.name}: a figure disagrees with bench/; run make docs"
    assert used and used <= set(figures), used - set(figures)
    assert {"results.rest_32x32", "load.requests", "mpnet.mpnet"} <= used


def test_the_configuration_reference_covers_every_section():
    table = docs.config_reference()
    for key in ("`dialects.long_inputs`", "`dialects.disabled`", "`providers[].base_url`", "`providers[].api_key_env`", "`models[].repo`"):
        assert key in table, key


def test_the_service_never_imports_the_bench():
    """Issue 29.4: bench/ (benchmarks, peers, the load test) is not part of what serves requests."""
    import re
    import subprocess
    import sys

    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"(?m)^\s*(from bench\b|import bench\b|from \.+bench\b)", text), path
    assert not (ROOT / "service" / "bench").exists()
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "python -m bench" in done.stdout, done.stderr[-500:]


def test_the_cpu_bench_names_what_the_event_loop_spent_its_samples_on():
    """bench/cpu.py splits the event loop's CPU by the deepest frame of ours in each py-spy sample (`make bench-cpu`)."""
    import subprocess
    import sys

    from bench.cpu import categorize

    loop = "thread (101): MainThread;<module> (service/__main__.py:92);BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    raw = "\n".join([
        f"{loop};Handle._run (asyncio/events.py:95) 7",
        f"{loop};Handle._run (asyncio/events.py:95);handle (service/rpc.py:152);Embedder.embed (service/engine/pipeline.py:120);"
        "AsciiWordPiece.encode (service/engine/wordpiece.py:80) 3",
        f"{loop};handle (service/rpc.py:152);respond (service/rpc.py:140);result_headers (service/rpc.py:110) 2",
        f"{loop};GateInterceptor.intercept_service (service/interceptors.py:60);is_loopback (service/interceptors.py:45) 1",
        "thread (102): tokenize_0;Thread.run (threading.py:982);AsciiWordPiece.encode (service/engine/wordpiece.py:80) 50",
        "not a sample",
    ])
    assert categorize(raw) == {"gRPC aio and the event loop": 7, "tokenizing (fast path)": 3, "serializing the answer": 2, "interceptors": 1}
    done = subprocess.run([sys.executable, "-m", "bench.cpu", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "python -m bench.cpu" in done.stdout, done.stderr[-500:]
