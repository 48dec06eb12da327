"""Issue 30.B: browsers. No route sent Access-Control-Allow-Origin and a preflight was a 404, so browser clients
(openai-node with dangerouslyAllowBrowser, huggingface.js, AIGNE's web apps) could not call the service. Now
`envoy.cors_allow_origins` (empty by default: no CORS headers) lets the origins it lists call every REST route; Envoy's
CORS filter answers the preflight. Through a real Envoy and server."""

from __future__ import annotations

import pytest
import requests

from service.config import ConfigError
from service.launch import Stack

from .conftest import stack_config

APP = "https://app.example.com"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def cors(tmp_path_factory):
    cfg = stack_config()
    cfg.envoy.cors_allow_origins = [APP]
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("cors-logs")) as s:
        yield s


def preflight(stack, origin: str, path: str = "/v1/embeddings") -> requests.Response:
    return requests.options(stack.http_url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-retry-count"})


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/v2/embed", "/api/embed", "/v1beta/models/m:embedContent", "/models/m"])
def test_a_listed_origin_passes_the_preflight_and_reads_the_answer(cors, path):
    r = preflight(cors, APP, path)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["access-control-allow-origin"] == APP
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"]  # a bearer token must be listed by name
    assert int(r.headers["access-control-max-age"]) > 0


def test_the_answer_carries_the_origin_and_exposes_the_apis_headers(cors):
    r = requests.post(cors.http_url + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers={"Origin": APP}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    assert "x-request-id" in r.headers["access-control-expose-headers"]
    r = requests.post(cors.http_url + "/v1/embeddings", json={"model": MODEL, "input": ""}, headers={"Origin": APP}, timeout=30)
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == APP  # a page can read the error too


def test_other_origins_and_the_default_get_no_cors_headers(cors, stack):
    r = preflight(cors, "https://evil.example")
    assert "access-control-allow-origin" not in r.headers
    r = requests.post(cors.http_url + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, headers={"Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    r = preflight(stack, APP)  # envoy.cors_allow_origins empty: off
    assert "access-control-allow-origin" not in r.headers


def test_origins_are_checked_at_start():
    cfg = stack_config()
    for bad in ("app.example.com", "https://app.example.com/", "javascript:alert(1)", "https://*.example.com"):
        cfg.envoy.cors_allow_origins = [bad]
        with pytest.raises(ConfigError, match="envoy.cors_allow_origins"):
            cfg.validate()
