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
    ("models[]", config_mod.ModelConfig),
]


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
            env = "—" if section == "models[]" else f"`{config_mod.ENV_PREFIX}{section.upper()}__{f.name.upper()}`"
            default = _default(f) if not (section == "models[]" and f.name == "id") else f"`{config_mod.DEFAULT_MODEL_ID}`"
            rows.append(f"| `{section}.{f.name}` | {default} | {env} | {notes.get(f.name, '')} |")
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


def main() -> int:
    for tag, page in PAGES.items():
        page.write_text(render(page.read_text(), [tag]))
        print(f"{page.relative_to(ROOT)}: {tag} regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
