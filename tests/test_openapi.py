"""The API reference (issue 28.2): the OpenAPI 3.1 document describes every REST route the protos bind and nothing
else, validates, is served through Envoy at /openapi.json, and every example in it, sent to the real service, gets an
answer its schema admits; Swagger UI at /docs works offline in a real browser (Debian's chromium), "Try it out" on
`POST /v1/embeddings` included."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from service import openapi
from service.config import Config
from service.dialects import enabled

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
METHODS = ("get", "post", "put", "delete", "patch", "head")


def bindings() -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every google.api.http rule in the descriptor set, the reference's own aside."""
    sys.path.insert(0, str(ROOT / "gen"))
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString((ROOT / "gen" / "descriptor.pb").read_bytes())
    out = set()
    for f in fds.file:
        for service in f.service:
            if service.name == "ApiReference":
                continue
            for m in service.method:
                if not m.options.HasExtension(annotations_pb2.http):
                    continue
                rule = m.options.Extensions[annotations_pb2.http]
                for r in (rule, *rule.additional_bindings):
                    kind = r.WhichOneof("pattern")
                    # {model=models/**} → models/{model}; {model=**} → {model}
                    path = re.sub(r"\{(\w+)=([\w/]*?)/?\*\*\}", lambda g: (g.group(2) + "/" if g.group(2) else "") + "{" + g.group(1) + "}", getattr(r, kind))
                    out.add((kind.upper(), path))
    return out


@pytest.fixture(scope="module")
def document():
    return openapi.document(enabled(Config()))


def test_the_document_is_valid_openapi_31(document):
    from openapi_spec_validator import validate

    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_rest_route_is_documented_and_nothing_else(document):
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops if method in METHODS}
    assert documented == bindings(), (bindings() - documented, documented - bindings())


def test_every_operation_has_its_apis_error_body_and_auth(document):
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert "default" in op["responses"] and op["tags"], (method, path)
            assert isinstance(op["security"], list), (method, path)


def test_a_disabled_api_leaves_the_document():
    cfg = Config()
    cfg.dialects.disabled = ["cohere"]
    assert "/v2/embed" not in openapi.document(enabled(cfg))["paths"]


def _resolve(document, node):
    while isinstance(node, dict) and "$ref" in node and len(node) == 1:
        _, kind, name = node["$ref"].lstrip("#/").split("/")[-3:]
        node = document["components"][kind][name]
    return node


def _validator(document, schema):
    from jsonschema import Draft202012Validator

    return Draft202012Validator({**copy.deepcopy(schema), "components": document["components"]})


def _cases(document):
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            yield method, path, op


def test_the_served_document_is_this_one_and_every_example_gets_an_answer_its_schema_admits(stack, document):
    served = requests.get(stack.http_url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["content-type"].startswith("application/json")
    assert served.json() == document
    tried = 0
    for method, path, op in _cases(document):
        url = path
        for p in op.get("parameters", []):
            p = _resolve(document, p)
            if p["in"] == "path":
                url = url.replace("{" + p["name"] + "}", p["example"])
        body = None
        if "requestBody" in op:
            content = _resolve(document, op["requestBody"])["content"]["application/json"]
            body = content["example"]
        r = requests.request(method, stack.http_url + url, json=body, timeout=60)
        responses = op["responses"]
        assert str(r.status_code) in responses, (method, path, r.status_code, r.text[:300])
        response = _resolve(document, responses[str(r.status_code)])
        content = response.get("content", {})
        if "application/json" in content:
            errors = list(_validator(document, content["application/json"]["schema"]).iter_errors(r.json()))
            assert not errors, (method, path, [e.message for e in errors][:3])
        elif "text/plain" in content:
            assert r.headers["content-type"].startswith("text/plain"), (method, path)
        tried += 1
    assert tried == sum(len(ops) for ops in document["paths"].values())


def test_errors_match_the_error_schemas(stack, document):
    """An unknown model on each API's main route answers its documented error body."""
    for method, path, op in _cases(document):
        if method != "post" or "requestBody" not in op:
            continue
        body = copy.deepcopy(_resolve(document, op["requestBody"])["content"]["application/json"]["example"])
        if not isinstance(body, dict) or "model" not in body or not isinstance(body["model"], str):
            continue
        body["model"] = "no-such-model"
        r = requests.post(stack.http_url + path.replace("{model}", "sentence-transformers/all-MiniLM-L6-v2"), json=body, timeout=30)
        assert r.status_code >= 400, (path, r.text[:200])
        schema = _resolve(document, op["responses"]["default"])["content"]["application/json"]["schema"]
        errors = list(_validator(document, schema).iter_errors(r.json()))
        assert not errors, (path, r.status_code, r.text[:200], [e.message for e in errors][:3])


def chromium() -> str:
    """Debian's chromium (installed here when missing, as tests/image.py installs podman)."""
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("chromium")
    assert found, "chromium is not installed (apt-get install chromium)"
    return found


def test_swagger_ui_tries_post_v1_embeddings_in_a_real_browser(stack):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "swagger-ui-try-it-out.png"
    asked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        # Offline: every request the page makes must be to this service.
        page.on("request", lambda req: asked.append(req.url))
        page.goto(stack.http_url + "/docs", wait_until="networkidle")
        op = page.locator("#operations-OpenAI-openai_create_embedding")
        op.locator(".opblock-summary").click()
        op.get_by_role("button", name="Try it out").click()
        op.get_by_role("button", name="Execute").click()
        body = op.locator(".responses-wrapper .live-responses-table .response-col_description pre").first
        body.wait_for(timeout=60_000)
        text = body.inner_text()
        op.scroll_into_view_if_needed()
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert '"embedding"' in text and '"object": "list"' in text, text[:500]
    assert shot.stat().st_size > 10_000
    assert asked and all(u.startswith(stack.http_url) for u in asked), [u for u in asked if not u.startswith(stack.http_url)]


def test_the_page_may_run_only_its_own_script(stack):
    r = requests.get(stack.http_url + "/docs", timeout=10)
    assert r.headers["x-content-type-options"] == "nosniff"
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert requests.get(stack.http_url + "/docs/swagger-ui-bundle.js", timeout=10).headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/docs/..%2F..%2F..%2Fetc%2Fpasswd", "/docs/%2E%2E%2Fcore.py", "/docs/swagger-editor.js", "/docs/index.html",
                                  "/docs/swagger-ui.css.map", "/docs/" + "a" * 5000])
def test_docs_serve_only_swagger_uis_own_files(stack, path):
    r = requests.get(stack.http_url + path, timeout=10)
    assert r.status_code == 404 and "root:" not in r.text and "import" not in r.text, (path, r.status_code, r.text[:200])


def test_the_reference_needs_no_key_but_the_apis_still_do(tmp_path_factory):
    import secrets

    from service.launch import Stack

    from .conftest import stack_config

    key = secrets.token_hex(16)
    with Stack(stack_config(), log_dir=tmp_path_factory.mktemp("reference-keyed"), extra_env={"EMBED_API_KEYS": key}) as s:
        for path in ("/openapi.json", "/docs", "/docs/swagger-ui-bundle.js"):
            assert requests.get(s.http_url + path, timeout=10).status_code == 200, path
        assert requests.post(s.http_url + "/v1/embeddings", json={"input": "a"}, timeout=10).status_code == 401


def test_a_flood_of_docs_downloads_never_slows_the_apis(stack):
    """The reference is open to every caller and its script is 1.5 MB: 200 callers fetching it at once (half of them
    never reading the answer) must leave an embedding caller answered, and the server up."""
    import socket
    import threading
    import time

    host, port = stack.http_url.rsplit("/", 1)[-1].split(":")
    stalled = []
    for _ in range(100):  # ask, and never read: the answer sits in Envoy's buffers under its limits
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET /docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(s)
    fetched = []

    def fetch():
        try:
            fetched.append(requests.get(stack.http_url + "/docs/swagger-ui-bundle.js", timeout=60).status_code)
        except requests.RequestException:
            fetched.append(0)

    threads = [threading.Thread(target=fetch) for _ in range(100)]
    for t in threads:
        t.start()
    latencies = []
    for i in range(20):
        t0 = time.perf_counter()
        r = requests.post(stack.http_url + "/v1/embeddings", json={"input": f"docs flood canary {i}"}, timeout=30)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text[:200]
    for t in threads:
        t.join(90)
    for s in stalled:
        s.close()
    assert fetched.count(200) >= 90, fetched  # Envoy may shed a few under its heap limit, never the APIs
    assert sorted(latencies)[-2] < 2.0, latencies
    assert requests.get(stack.http_url + "/openapi.json", timeout=10).status_code == 200
