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
