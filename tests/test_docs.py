"""The README's configuration and metrics references are what the code says (they cannot drift)."""

from __future__ import annotations

from pathlib import Path

from service.tools import docs

ROOT = Path(__file__).resolve().parents[1]


def test_readme_references_are_current():
    readme = (ROOT / "README.md").read_text()
    assert docs.render(readme) == readme, "run: make docs"


def test_every_config_key_is_documented():
    table = docs.config_reference()
    for line in table.splitlines()[2:]:
        assert line.rstrip().endswith("|") and not line.rstrip().endswith("|  |"), f"undocumented: {line}"
