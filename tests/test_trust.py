"""Trust under attack and faults (issue 10): each test here failed on the code before it, in the way its name says.

Keys: a credential is all of its parts; a reload never opens the service, never quotes the file; an open service
answers only its own machine. Hostile input: one huge request never stalls another; deep nesting is a 400; every
limit applies on every path; the native port is bounded. Faults: upstream retries are one budget; responses reveal
no paths and no other tenant's cache.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time

import grpc
import orjson
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc
from embedding.dialects.v1 import hrflow_pb2, hrflow_pb2_grpc, huggingface_pb2, huggingface_pb2_grpc, ollama_pb2, ollama_pb2_grpc, tei_pb2, tei_pb2_grpc
from google.protobuf import struct_pb2
from service import envoy
from service.config import ModelConfig
from service.launch import Stack

from .conftest import stack_config

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ALPHA = "sk-alpha-0001-aaaa"  # a key alone
BRAVO_KEY, BRAVO_SECRET = "kb-bravo-0002-bbbb", "sb-bravo-secret-2222"  # a key with a secret
CHARLIE = "kc-charlie-0003-cccc"  # a second tenant
ROTATED = "sk-rotated-0004-dddd"
LEAKY = "sk-should-never-be-logged-7777"


def keys_yaml(*extra: str) -> str:
    return (
        f"keys:\n  - name: alpha\n    key: {ALPHA}\n  - name: bravo\n    key: {BRAVO_KEY}\n    secret: {BRAVO_SECRET}\n"
        f"  - name: charlie\n    key: {CHARLIE}\n" + "".join(extra)
    )


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trust-keys") / "keys.yaml"
    path.write_text(keys_yaml())
    return path


@pytest.fixture(scope="module")
def keyed(keys_file, tmp_path_factory):
    cfg = stack_config()
    cfg.auth.keys_file = str(keys_file)
    cfg.auth.reload_interval_seconds = 0.5
    cfg.server.log_level = "debug"
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("trust-logs")) as s:
        yield s


def basic(text: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(text.encode()).decode()}


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


def call(stack, route: str, headers: dict[str, str], text: str = "hi") -> requests.Response:
    bodies = {
        "inworld": ("/ml/v1alpha/embedding:embed", {"inputs": [{"text": text}]}),
        "openai": ("/v1/embeddings", {"input": text, "model": MODEL}),
        "aigne": ("/api/embeddings", {"input": text, "model": MODEL}),
        "huggingface": (f"/models/{MODEL}", {"inputs": text}),
        "hrflow": ("/v1/document/embedding", {"item_type": "job", "item": {"name": text}}),
    }
    path, body = bodies[route]
    return requests.post(stack.http_url + path, json=body, headers=headers, timeout=60)


def metric(stack, name: str, labels: str = "") -> float:
    text = requests.get(stack.metrics_urls[0], timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + (f"{{{labels}}}" if labels else "")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- 1. a credential is all of its parts ----------------------------------------------------------


def test_a_key_with_a_secret_never_gets_in_without_it(keyed):
    hrflow_email = {"X-USER-EMAIL": "me@example.com"}
    refused = [
        ("inworld", basic(BRAVO_KEY)),  # no colon at all
        ("inworld", basic(BRAVO_KEY + ":")),  # an empty secret
        ("inworld", basic(f"{BRAVO_KEY}:wrong-secret")),
        ("openai", bearer(BRAVO_KEY)),
        ("aigne", bearer(BRAVO_KEY)),
        ("huggingface", bearer(BRAVO_KEY)),
        ("hrflow", {"X-API-KEY": BRAVO_KEY, **hrflow_email}),
        ("openai", bearer(f"{ALPHA}:made-up-secret")),  # a key without a secret takes none
        ("inworld", basic(f"{ALPHA}:made-up-secret")),
    ]
    for route, headers in refused:
        r = call(keyed, route, headers)
        assert r.status_code == 401, (route, headers, r.status_code, r.text)
    allowed = [
        ("inworld", basic(f"{BRAVO_KEY}:{BRAVO_SECRET}")),
        ("openai", bearer(f"{BRAVO_KEY}:{BRAVO_SECRET}")),
        ("aigne", bearer(f"{BRAVO_KEY}:{BRAVO_SECRET}")),
        ("huggingface", bearer(f"{BRAVO_KEY}:{BRAVO_SECRET}")),
        ("hrflow", {"X-API-KEY": f"{BRAVO_KEY}:{BRAVO_SECRET}", **hrflow_email}),
        ("inworld", basic(ALPHA)),
        ("inworld", basic(ALPHA + ":")),
        ("openai", bearer(ALPHA)),
    ]
    for route, headers in allowed:
        r = call(keyed, route, headers)
        assert r.status_code == 200, (route, headers, r.status_code, r.text)
    with grpc.insecure_channel(keyed.server_targets[0]) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        req = pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="hi")])
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(req, metadata=[("authorization", f"Bearer {BRAVO_KEY}")], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Embed(req, metadata=[("authorization", f"Bearer {BRAVO_KEY}:{BRAVO_SECRET}")], timeout=10).embeddings


# -- 2. reloads fail closed --------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 15.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


NESTED = "keys: " + "[" * 100_000 + "]" * 100_000 + "\n"  # the YAML parser's RecursionError, not a YAMLError
INVALID = (f"keys: [\n  - {{key: {LEAKY}\n", "keys:\n  - name: x\n", NESTED)


@pytest.mark.parametrize("content", ["", "# only comments\n# here\n", "keys: []\n", *INVALID], ids=lambda c: repr(c[:20]))
@pytest.mark.parametrize("how", ["sighup", "watcher"])
def test_a_bad_or_empty_reload_keeps_the_keys(keyed, keys_file, content, how):
    good = keys_file.read_text()
    result = "invalid" if content in INVALID else "empty"
    before = metric(keyed, "embedding_credential_reloads_total", f'result="{result}"')
    try:
        keys_file.write_text(content)
        if how == "sighup":  # the watcher sees the change too; "watcher": it alone (a Secret volume sends no signal)
            keyed.stop_server(0, signal.SIGHUP)
        wait_for(lambda: metric(keyed, "embedding_credential_reloads_total", f'result="{result}"') > before, what="the rejected reload")
        for route in ("openai", "inworld", "hrflow"):
            assert call(keyed, route, {}).status_code == 401, route
        assert call(keyed, "openai", bearer(ALPHA)).status_code == 200
        # The watcher outlives a file it rejected: the next good one is picked up without a signal.
        keys_file.write_text(keys_yaml(f"  - name: rotated\n    key: {ROTATED}\n"))
        wait_for(lambda: call(keyed, "openai", bearer(ROTATED)).status_code == 200, what="the next good file")
    finally:
        keys_file.write_text(good)
        keyed.stop_server(0, signal.SIGHUP)
        wait_for(lambda: call(keyed, "openai", bearer(ROTATED)).status_code == 401, what="the restored keys")
    logs = keyed.logs(tail=None)
    assert "keeping the previous ones" in logs
    assert LEAKY not in logs and ALPHA not in logs and BRAVO_SECRET not in logs


def test_a_changed_keys_file_is_picked_up_without_a_signal(keyed, keys_file):
    good = keys_file.read_text()
    try:
        # The way a Kubernetes Secret volume changes: a new file swapped in, no signal.
        tmp = keys_file.with_suffix(".new")
        tmp.write_text(keys_yaml(f"  - name: rotated\n    key: {ROTATED}\n"))
        os.replace(tmp, keys_file)
        wait_for(lambda: call(keyed, "openai", bearer(ROTATED)).status_code == 200, what="the rotated key")
        tmp.write_text(f"keys:\n  - name: rotated\n    key: {ROTATED}\n")  # and one removed
        os.replace(tmp, keys_file)
        wait_for(lambda: call(keyed, "openai", bearer(ALPHA)).status_code == 401, what="the removed key to stop working")
    finally:
        keys_file.write_text(good)
        wait_for(lambda: call(keyed, "openai", bearer(ALPHA)).status_code == 200, what="the restored keys")


def test_a_keys_file_without_keys_refuses_to_start(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"# {LEAKY}\nkeys: []\n")
    env = {**os.environ, "EMBED__AUTH__KEYS_FILE": str(keys), "EMBED__SERVER__GRPC_PORT": "0", "EMBED__SERVER__METRICS": "false"}
    r = subprocess.run([sys.executable, "-m", "service"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "holds no keys" in r.stderr and LEAKY not in r.stderr + r.stdout


# -- 3, 4. the loopback rule covers Envoy; what stays open is switchable ----------------------------------


def test_envoy_listens_on_loopback_for_an_open_service():
    cfg = stack_config()
    cfg.envoy.listen_host = "0.0.0.0"
    assert envoy.listen_host(cfg, env={}) == "127.0.0.1"
    rendered = envoy.render(cfg)
    assert {ln["address"]["socket_address"]["address"] for ln in rendered["static_resources"]["listeners"]} == {"127.0.0.1"}
    assert envoy.listen_host(cfg, env={"EMBED_API_KEYS": "sk-a-key-of-16-chars"}) == "0.0.0.0"
    cfg.auth.allow_open_non_loopback = True
    assert envoy.listen_host(cfg, env={}) == "0.0.0.0"


def test_an_open_server_answers_only_its_own_machine(stack):
    # Envoy writes the caller's real address, whatever the caller sent under that name: here, loopback.
    r = requests.post(stack.http_url + "/v1/embeddings", json={"input": "hi", "model": MODEL},
                      headers={envoy.DOWNSTREAM_HEADER: "203.0.113.9"}, timeout=30)
    assert r.status_code == 200, r.text
    # A call that Envoy forwarded from another machine is refused by the open server itself.
    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.EmbeddingServiceStub(ch).Embed(
                pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="hi")]), metadata=[(envoy.DOWNSTREAM_HEADER, "203.0.113.9")], timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """Reflection and per-model health off; a small native port: 1 MiB messages, few streams."""
    cfg = stack_config()
    cfg.server.reflection = False
    cfg.server.health_per_model = False
    cfg.server.max_message_bytes = 1024 * 1024
    cfg.server.max_health_watchers = 2
    broken = tmp_path_factory.mktemp("not-a-model")
    (broken / "modules.json").write_text("[]")
    cfg.models.append(ModelConfig(id="broken-model", path=str(broken), load="lazy"))
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("bounded-logs")) as s:
        s.broken_path = str(broken)
        yield s


def test_what_stays_open_can_be_switched_off(bounded, stack):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def list_services(target):
        with grpc.insecure_channel(target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            return list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))

    assert list_services(stack.server_targets[0])  # on by default
    with pytest.raises(grpc.RpcError) as e:
        list_services(bounded.server_targets[0])
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED

    def health(target, service):
        with grpc.insecure_channel(target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert health(stack.server_targets[0], f"model:{MODEL}") == health_pb2.HealthCheckResponse.SERVING
    assert health(bounded.server_targets[0], "") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        health(bounded.server_targets[0], f"model:{MODEL}")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# -- 5. one huge request never stalls another ---------------------------------------------------------------


def canary(stack, headers: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = requests.post(stack.http_url + "/v1/embeddings", json={"input": f"canary {random.random()}", "model": MODEL}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def hostile_bodies() -> dict[str, bytes]:
    rng = random.Random(7)
    ids = lambda n: [rng.randrange(1000, 30000) for _ in range(n)]  # noqa: E731
    return {
        # The issue's own: 7+ MiB of 4,800 token-id lists, refused in the end as too many inputs.
        "4800 token lists": orjson.dumps({"input": [ids(300) for _ in range(4800)], "model": MODEL}),
        # Within the count, each list over the model's 256 tokens: refused after conversion.
        "2048 long token lists": orjson.dumps({"input": [ids(600) for _ in range(2048)], "model": MODEL}),
        # One input of a million token ids.
        "one huge token list": orjson.dumps({"input": ids(1_000_000), "model": MODEL}),
        # 2049 texts of ~3.9 KB: refused as too many, after a body of 7.8 MiB was read. (A valid request that large
        # is computed in batches, and a canary waits for at most one batch: the batcher's tests hold that.)
        "2049 long texts": orjson.dumps({"input": [" ".join(f"w{rng.randrange(10**6)}" for _ in range(480))[:3900] for _ in range(2049)], "model": MODEL}),
    }


def test_one_huge_request_never_stalls_another(stack):
    for _ in range(5):
        canary(stack)  # warm
    idle = [canary(stack) for _ in range(20)]
    idle_p50 = statistics.median(idle)
    worst = {}
    for name, body in hostile_bodies().items():
        assert len(body) < 8 * 1024 * 1024
        tries = []
        for _ in range(3):  # the best of three: a stall caused by the request shows every time, a noisy neighbour does not
            done = threading.Event()
            answer = {}

            def send(body=body, answer=answer, done=done):
                r = requests.post(stack.http_url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"}, timeout=120)
                answer["status"] = r.status_code
                done.set()

            threading.Thread(target=send, daemon=True).start()
            samples = []
            while not done.is_set():
                samples.append(canary(stack))
            assert answer["status"] == 400, (name, answer)
            tries.append(max(samples) if samples else 0.0)
        worst[name] = min(tries)
    print("idle p50 %.1f ms; worst canary while hostile: %s" % (idle_p50 * 1000, {k: round(v * 1000, 1) for k, v in worst.items()}))
    # A generous bound for a shared 2-core machine: the target is +50 ms; before this fix one such
    # request held the canary for 1,871 ms.
    for name, seconds in worst.items():
        assert seconds <= idle_p50 + 0.05, (name, round(seconds * 1000, 1), "ms against idle p50", round(idle_p50 * 1000, 1))


# -- 6, 8. deep nesting is a 400; every limit on every path ------------------------------------------------


def test_a_deeply_nested_hrflow_item_is_a_400_in_hrflows_shape(stack):
    deep = "[" * 100_000 + "]" * 100_000
    r = requests.post(stack.http_url + "/v1/document/embedding", json={"item_type": "job", "item": deep}, timeout=60)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == 400 and "Invalid Item" in body["message"]
    nested = '{"a":' * 2000 + '{"text":"x"}' + "}" * 2000  # an object nested past every parser's depth limit
    r = requests.post(stack.http_url + "/v1/document/embedding", data='{"item_type":"job","item":' + nested + "}",
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"code", "message"}
    assert "RecursionError" not in stack.logs(tail=None)


def test_max_input_chars_applies_when_truncating_too(stack):
    long = "word " * 40_001  # 200,005 characters: over limits.max_input_chars
    r = requests.post(stack.http_url + "/ml/v1alpha/embedding:embed", json={"inputs": [{"text": long}]}, timeout=60)
    assert r.status_code == 400 and "characters" in r.json()["message"], r.text
    r = requests.post(stack.http_url + "/v1/document/embedding", json={"item_type": "job", "item": {"text": long}}, timeout=60)
    assert r.status_code == 400, r.text


# -- 7. the native port is bounded ----------------------------------------------------------------------------


def test_the_native_port_refuses_oversized_messages_and_too_many_watches(bounded):
    with grpc.insecure_channel(bounded.server_targets[0]) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        big = pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="x" * 100_000) for _ in range(12)])  # 1.2 MB
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(big, timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        health = health_pb2_grpc.HealthStub(ch)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(2)]
        for w in watches:
            assert next(w).status == health_pb2.HealthCheckResponse.SERVING
        third = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            next(third)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for w in watches:
            w.cancel()
        assert stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="still fine")]), timeout=30).embeddings


def test_reflection_streams_are_bounded_and_freed(stack):
    """Reflection is open (no key) and each call is a stream a client may keep open: past the bound one is refused,
    and a closed stream frees its place."""
    import queue

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    bound = stack_config().server.max_reflection_streams
    ask = reflection_pb2.ServerReflectionRequest(list_services="")

    def open_stream(stub):
        """A reflection stream that has answered once and stays open (its request iterator blocks)."""
        requests_q: queue.Queue = queue.Queue()
        requests_q.put(ask)
        call = stub.ServerReflectionInfo(iter(requests_q.get, None), timeout=60)
        return call, requests_q

    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        held = [open_stream(stub) for _ in range(bound)]
        for call, _ in held:
            assert next(call).list_services_response.service
        extra, extra_q = open_stream(stub)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        extra_q.put(None)
        first, first_q = held.pop(0)
        first_q.put(None)  # the client closes its side: the stream ends and frees its place
        assert list(first) == []
        again, again_q = open_stream(stub)
        assert next(again).list_services_response.service
        for _, q in [*held, (again, again_q)]:
            q.put(None)


# -- 12. what a response reveals --------------------------------------------------------------------------------


def test_a_model_that_fails_to_load_names_no_path(bounded):
    r = requests.post(bounded.http_url + "/v1/embeddings", json={"input": "x", "model": "broken-model"}, timeout=60)
    for _ in range(100):
        if r.status_code != 503 or "loading" not in r.text:
            break
        time.sleep(0.2)
        r = requests.post(bounded.http_url + "/v1/embeddings", json={"input": "x", "model": "broken-model"}, timeout=60)
    assert r.status_code == 503, r.text
    assert "failed to load" in r.json()["error"]["message"]
    assert bounded.broken_path not in r.text and "/" not in r.json()["error"]["message"].split("broken-model")[-1]
    assert bounded.broken_path in bounded.logs(tail=None)  # the operator sees why


def test_one_tenant_cannot_see_anothers_cache(keyed):
    text = f"a secret sentence {random.random()}"

    def cache(key):
        r = call(keyed, "openai", bearer(key), text)
        assert r.status_code == 200, r.text
        return r.headers["x-cache"]

    assert cache(ALPHA) == "miss"
    assert cache(ALPHA) == "hit"
    assert cache(CHARLIE) == "miss"  # charlie learns nothing about what alpha embedded
    assert cache(CHARLIE) == "hit"


# -- 11. retries are one budget end to end ---------------------------------------------------------------------


def test_upstream_failures_are_retried_once_end_to_end(tmp_path):
    from .test_providers import ScriptedUpstream, front_config

    fake = ScriptedUpstream([])
    try:
        with Stack(front_config(fake.url, max_retries=3), log_dir=tmp_path) as s:
            for step, status, calls in (("500", 503, 4), ("401", 503, 1), ("403", 503, 1), ("400", 400, 1)):
                fake.script[:] = [step] * 10
                fake.calls.clear()
                r = requests.post(s.http_url + "/v1/embeddings", json={"input": f"x {step}", "model": "remote/minilm"}, timeout=60)
                assert r.status_code == status, (step, r.text)
                assert len(fake.calls) == calls, (step, len(fake.calls))  # 1 + max_retries for a 5xx; a 4xx never again
    finally:
        fake.server.shutdown()


def test_a_failed_upstream_batch_cancels_its_siblings(tmp_path):
    from .test_providers import ScriptedUpstream, front_config

    fake = ScriptedUpstream(["400"] + ["ok"] * 10)
    try:
        # One input per upstream batch, one at a time: after the first batch fails, no other is sent.
        with Stack(front_config(fake.url, max_batch=1, max_concurrency=1), log_dir=tmp_path) as s:
            r = requests.post(s.http_url + "/v1/embeddings", json={"input": ["a", "b", "c", "d"], "model": "remote/minilm"}, timeout=60)
            assert r.status_code == 400, r.text
            time.sleep(0.5)
            assert len(fake.calls) == 1
    finally:
        fake.server.shutdown()


# -- the second hostile review: each of these held a replica (or a tenant's vectors) before its fix ------------------


def test_idle_calls_hold_no_slot_and_never_starve_health(tmp_path):
    """Calls that send headers and never a message (a slowloris) must not fill the server's call limit: health and
    real calls still answer."""
    import asyncio

    cfg = stack_config()
    cfg.server.max_concurrent_rpcs = 4
    with Stack(cfg.validate(), log_dir=tmp_path) as s:

        async def main():
            async def never():
                await asyncio.sleep(3600)
                yield b""

            chans = [grpc.aio.insecure_channel(s.server_targets[0]) for _ in range(3)]
            calls = []
            for i in range(12):
                method = chans[i % 3].stream_unary("/ai.inworld.embedding.v1alpha.EmbeddingService/Embed",
                                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
                calls.append(method(never()))
            await asyncio.sleep(1.0)
            async with grpc.aio.insecure_channel(s.server_targets[0]) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                embedded = await pb_grpc.EmbeddingServiceStub(ch).Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="hi")]), timeout=10)
            for c in calls:
                c.cancel()
            for c in chans:
                await c.close()
            return health.status, len(embedded.embeddings)

        assert asyncio.run(main()) == (health_pb2.HealthCheckResponse.SERVING, 1)
        assert requests.get(s.ready_url, timeout=5).status_code == 200


def test_a_huge_name_in_an_error_breaks_nobody_elses_request(stack):
    name = "m" * 30_000
    with cf.ThreadPoolExecutor(8) as pool:
        poisoned = [pool.submit(requests.post, stack.http_url + "/v1/embeddings", json={"input": "x", "model": name}, timeout=60) for _ in range(6)]
        innocent = [pool.submit(canary, stack) for _ in range(20)]
        for f in poisoned:
            r = f.result()
            assert r.status_code == 404 and len(r.text) < 2000, (r.status_code, len(r.text))
        for f in innocent:
            f.result()  # canary() asserts its 200


def test_an_open_server_ignores_x_forwarded_for(stack):
    """Envoy passes the direct peer's address, never what a caller claims in X-Forwarded-For."""
    r = requests.post(stack.http_url + "/v1/embeddings", json={"input": "hi", "model": MODEL},
                      headers={"X-Forwarded-For": "203.0.113.9"}, timeout=30)
    assert r.status_code == 200, r.text
    assert not envoy.keys_configured(stack_config(), env={"EMBED_API_KEYS": ","})  # as the server reads it: no key


def test_keys_files_are_read_as_written(tmp_path):
    from service import auth

    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {name: prod, key: sk-p}\n")  # the first characters of a key, as a file caught mid-write
    with pytest.raises(auth.KeysFileError) as e:
        auth.CredentialStore(str(path), env={})
    assert "shorter than 16" in str(e.value) and "sk-p" not in str(e.value)
    path.write_text("keys:\n  - {name: a, key: sk-numeric-secret-01, secret: 0123}\n")  # YAML reads 83
    with pytest.raises(auth.KeysFileError) as e:
        auth.CredentialStore(str(path), env={})
    assert "quote it" in str(e.value)
    path.write_text("keys:\n  - {name: same, key: sk-tenant-one-000001}\n  - {name: same, key: sk-tenant-two-000002}\n")
    store = auth.CredentialStore(str(path), env={})
    one, two = store.match([("sk-tenant-one-000001", None)]), store.match([("sk-tenant-two-000002", None)])
    assert one.name == two.name and one.identity != two.identity  # the cache is partitioned by identity, not name


def test_a_dead_offload_worker_fails_only_its_own_request():
    import asyncio
    import os as _os

    from service import errors as service_errors
    from service import offload

    async def main():
        offload.start(1)
        try:
            with pytest.raises(service_errors.ServiceError) as e:
                await offload.run(_os._exit, 1)  # kills its worker, on the pool and again on the new one
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            results = await asyncio.gather(*(offload.run(pow, 2, i) for i in range(6)))
            assert results == [2**i for i in range(6)]
        finally:
            offload.stop()

    asyncio.run(main())


# -- round 2 (issue 27) --------------------------------------------------------------------------------------------


def threads_of(pid: int) -> int:
    return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("Threads:")).split()[1])


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU of a process and its live children (the offload workers), from /proc."""
    total = 0.0
    pids = [pid] + [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def half_sent(port: int, n: int) -> list:
    """`n` connections that each send the start of a request and never finish it."""
    import socket

    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            socks.append(s)
        except OSError:  # refused or reset once a listener is full: that is the bound working
            pass
    return socks


def test_a_flood_on_the_metrics_ports_costs_the_serving_path_nothing(tmp_path):
    """The review's repro (issue 27.1): 2,000 half-sent requests to the metrics port grew prometheus_client's server
    to 2,024 threads, and once they closed the server sat at ~150 % CPU for minutes. Now, on the server's own port
    and on Envoy's metrics listener in front of it: the server's threads stay flat, callers are served as fast as on
    an idle server while the flood is held, and once it closes the server is idle again; a scrape still works."""
    from service.launch import free_port

    cfg = stack_config()
    cfg.envoy.metrics_port = free_port()
    with Stack(cfg.validate(), log_dir=tmp_path) as s:
        pid = s.servers[0].pid
        for _ in range(5):
            canary(s)
        idle = statistics.median([canary(s) for _ in range(20)])
        threads = threads_of(pid)
        held = []
        for port, url in ((s.metrics_ports[0], s.server_metrics_urls[0]), (cfg.envoy.metrics_port, s.metrics_urls[0])):
            held += half_sent(port, 1000)
            during = [canary(s) for _ in range(20)]
            assert threads_of(pid) <= threads + 2, (url, threads, threads_of(pid))
            assert statistics.median(during) <= idle + 0.02, (url, statistics.median(during), idle)
        for sock in held:
            sock.close()
        time.sleep(1.0)
        before = cpu_seconds_of(pid)
        time.sleep(3.0)
        busy = cpu_seconds_of(pid) - before
        print(f"\nidle p50 {idle * 1000:.1f} ms; threads {threads} -> {threads_of(pid)}; server CPU over 3 s after the flood: {busy:.2f} s")
        assert busy < 0.3, busy
        wait_for(lambda: requests.get(s.metrics_urls[0], timeout=5).status_code == 200, timeout=10, what="a scrape through Envoy")
        assert "embedding_requests_total" in requests.get(s.metrics_urls[0], timeout=5).text
        assert "envoy_" in requests.get(s.metrics_urls[0].replace("/metrics", "/stats/prometheus"), timeout=5).text


def test_envoys_metrics_listener_serves_only_metrics(tmp_path):
    from service.launch import free_port

    cfg = stack_config()
    cfg.envoy.metrics_port = free_port()
    with Stack(cfg.validate(), log_dir=tmp_path):
        base = f"http://127.0.0.1:{cfg.envoy.metrics_port}"
        assert requests.get(base + "/metrics", timeout=5).status_code == 200
        for path in ("/stats", "/quitquitquit", "/healthcheck/fail", "/clusters", "/v1/embeddings"):
            assert requests.get(base + path, timeout=5).status_code == 404, path
        assert requests.post(base + "/metrics", timeout=5).status_code == 404
        # Scrapes past the rate limit are refused by Envoy, never passed to the server.
        codes = [requests.get(base + "/metrics", timeout=5).status_code for _ in range(envoy.METRICS_RATE_PER_SECOND + 10)]
        assert 429 in codes and set(codes) <= {200, 429}


NAN_CASES = {
    "hrflow item": lambda: (hrflow_pb2_grpc.HrFlowStub, "DocumentEmbedding", hrflow_pb2.DocumentEmbeddingRequest(
        item_type="job", item=struct_pb2.Value(struct_value=struct_pb2.Struct(fields={"name": struct_pb2.Value(string_value="Chef"),
                                                                                        "n": struct_pb2.Value(number_value=float("nan"))})))),
    "hrflow return_sequences": lambda: (hrflow_pb2_grpc.HrFlowStub, "DocumentEmbedding", hrflow_pb2.DocumentEmbeddingRequest(
        item_type="job", item=struct_pb2.Value(string_value='{"text": "Chef"}'), return_sequences=struct_pb2.Value(number_value=float("inf")))),
    "huggingface parameters": lambda: (huggingface_pb2_grpc.HuggingFaceStub, "FeatureExtraction", huggingface_pb2.FeatureExtractionRequest(
        model=MODEL, inputs=struct_pb2.Value(string_value="hi"),
        parameters=struct_pb2.Struct(fields={"normalize": struct_pb2.Value(number_value=float("-inf"))}))),
    # Issue 30's new fields: Ollama's options.num_ctx, TEI's /similarity parameters and /vertex instances.
    "ollama num_ctx": lambda: (ollama_pb2_grpc.OllamaStub, "Embed", ollama_pb2.OllamaEmbedRequest(
        model=MODEL, input=struct_pb2.Value(string_value="hi"),
        options=struct_pb2.Struct(fields={"num_ctx": struct_pb2.Value(number_value=float("nan"))}))),
    "tei similarity parameters": lambda: (tei_pb2_grpc.TextEmbeddingsInferenceStub, "Similarity", tei_pb2.TeiSimilarityRequest(
        inputs=struct_pb2.Value(struct_value=struct_pb2.Struct(fields={"source_sentence": struct_pb2.Value(string_value="a"),
                                                                       "sentences": struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="b")]))})),
        parameters=struct_pb2.Value(struct_value=struct_pb2.Struct(fields={"truncate": struct_pb2.Value(number_value=float("inf"))})))),
    "tei vertex instance": lambda: (tei_pb2_grpc.TextEmbeddingsInferenceStub, "Vertex", tei_pb2.TeiVertexRequest(
        instances=struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(struct_value=struct_pb2.Struct(
            fields={"inputs": struct_pb2.Value(string_value="a"), "dimensions": struct_pb2.Value(number_value=float("nan"))}))])))),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_or_infinity_inside_a_value_is_a_clean_invalid_argument(stack, case):
    """Issue 27.3: native gRPC can carry NaN and Infinity in a google.protobuf.Value, which JSON cannot; converting it
    raised inside json_format and answered INTERNAL with a logged traceback. Now INVALID_ARGUMENT naming the field."""
    stub_class, method, request = NAN_CASES[case]()
    with grpc.insecure_channel(stack.envoy_target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub_class(ch), method)(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    # JSON's converter names it, or TEI's field reader does (`invalid type: floating point `inf``, as serde words it)
    assert "NaN or Infinity" in e.value.details() or "floating point `inf`" in e.value.details(), e.value.details()


def test_silent_connections_cannot_hold_envoys_connection_budget(tmp_path):
    """Issue 27.6: request_headers_timeout starts at the first byte and the idle timeout was Envoy's hour, so
    connections that send nothing held the whole budget (4,100 of them, 4,096 allowed). Now a connection that sends
    nothing is closed after a few seconds: with the budget filled by silent connections, a caller gets in as soon as
    they are gone, and a connection that sent a request and then idles is closed after the idle timeout."""
    import socket

    cfg = stack_config()
    cfg.envoy.max_connections = 64
    cfg.envoy.idle_timeout_seconds = 3
    with Stack(cfg.validate(), log_dir=tmp_path) as s:
        port = s.config.envoy.listen_port
        silent = []
        for _ in range(80):
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                pass
        opened = time.monotonic()
        served_after = None
        while time.monotonic() - opened < 20:
            try:
                if requests.post(s.http_url + "/v1/embeddings", json={"input": "hi", "model": MODEL}, timeout=3).status_code == 200:
                    served_after = time.monotonic() - opened
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        closed = 0
        for sock in silent:
            sock.settimeout(0.1)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                closed += 1
            sock.close()
        assert len(silent) >= cfg.envoy.max_connections
        print(f"\n{len(silent)} silent connections; a caller served after {served_after}s; {closed} closed by Envoy")
        assert served_after is not None and served_after <= envoy.FIRST_BYTES_SECONDS + 3, served_after
        assert closed == len(silent)
        # Idle after a request: closed after idle_timeout_seconds.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            c.settimeout(15)
            while c.recv(4096):
                pass
            # the idle timeout, then Envoy's drain (5 s by default) before the close
            assert time.monotonic() - started <= cfg.envoy.idle_timeout_seconds + 5 + 2


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its live children, in MiB."""
    total = 0
    for p in [pid] + [int(x) for x in open(f"/proc/{pid}/task/{pid}/children").read().split()]:
        try:
            total += int(next(line for line in open(f"/proc/{p}/status") if line.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration):
            pass
    return total / 1024


@pytest.fixture(scope="module")
def streaming(keys_file, tmp_path_factory):
    """A keyed stack with small stream bounds: 3 streams per credential, 4 MiB per stream, 6 MiB for all, 2 s idle."""
    cfg = stack_config()
    cfg.auth.keys_file = str(keys_file)
    cfg.limits.max_streams_per_credential = 3
    cfg.limits.max_stream_bytes = 4 * 1024 * 1024
    cfg.limits.max_streams_bytes = 6 * 1024 * 1024
    cfg.limits.stream_idle_seconds = 2.0
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("streaming-logs")) as s:
        yield s


def test_a_stream_reads_no_more_than_its_bytes_allow():
    """Issue 27.2, the mechanism: a stream holds at most limits.max_stream_bytes of requests read and not answered, and
    all streams together limits.max_streams_bytes; past either it stops reading (the caller's writes then wait on
    gRPC's flow control). Before, a stream read ahead by count only: WINDOW groups of GROUP messages and an inbox,
    ~1,150 of them whatever their size."""
    import asyncio

    from service import streams
    from service.config import LimitsConfig

    MiB = 1 << 20
    limits = LimitsConfig(max_stream_bytes=4 * MiB, max_streams_bytes=6 * MiB, stream_idle_seconds=60)
    server = streams.Streams(limits)
    pulled = {"a": 0, "b": 0}

    async def requests_(name):
        for i in range(1000):
            pulled[name] += 1
            yield i

    async def never(group):  # work that never ends: nothing is ever answered, nothing released
        await asyncio.sleep(3600)

    async def main():
        a = streams.in_order(requests_("a"), never, group_size=16, streams=server, size=lambda m: MiB)
        b = streams.in_order(requests_("b"), never, group_size=16, streams=server, size=lambda m: MiB)
        ta, tb = asyncio.ensure_future(a.__anext__()), asyncio.ensure_future(b.__anext__())
        await asyncio.sleep(0.5)
        held = server.budget.held
        ta.cancel(), tb.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        await a.aclose(), await b.aclose()
        return held, server.budget.held

    held, after = asyncio.run(main())
    # Each read message is 1 MiB: a stream is stopped by its own 4 MiB or by what is left of the 6 MiB (each may have
    # pulled one more off its stream, waiting for room).
    assert held == 6 * MiB and max(pulled.values()) <= 5 and sum(pulled.values()) <= 6 + 2, (pulled, held)
    assert after == 0  # everything given back when the streams end


def test_streams_that_never_read_hold_bounded_bytes(streaming):
    """Issue 27.2, end to end: two EmbedStreams writing 1,200 messages of 200,000 characters (truncate: true) and never
    reading an answer grew the server by ~530 MiB here (450 -> 980 MiB); a stream's window counted messages, not bytes.
    Now the bytes all streams hold (embedding_stream_bytes) never pass limits.max_streams_bytes (6 MiB on this stack).
    The server's RSS is printed, not asserted: with the held bytes bounded it still grew +197 to +615 MiB from run to
    run, by what malloc keeps of the 200 KB messages' turnover (see the commit that bounded streams)."""
    from tei.v1 import tei_pb2, tei_pb2_grpc

    text = "word " * 40_000
    pid = streaming.servers[0].pid
    for _ in range(3):
        canary(streaming, bearer(ALPHA))
    before = rss_mib(pid)
    channels, calls = [], []
    for key in (ALPHA, CHARLIE):
        ch = grpc.insecure_channel(streaming.envoy_target)
        channels.append(ch)
        # Never read: the call's answers are left in its queue.
        calls.append(tei_pb2_grpc.EmbedStub(ch).EmbedStream(iter(tei_pb2.EmbedRequest(inputs=text, truncate=True) for _ in range(1200)),
                                                              metadata=[("authorization", f"Bearer {key}")], timeout=120))
    held, opened, peak = [], [], before
    url = streaming.server_metrics_urls[0]
    for _ in range(16):
        time.sleep(0.5)
        peak = max(peak, rss_mib(pid))
        text_ = requests.get(url, timeout=5).text
        held.append(gauge(text_, "embedding_stream_bytes"))
        opened.append(gauge(text_, "embedding_streams_open"))
    print(f"\nheld bytes at most {max(held):,.0f}; server RSS {before:.0f} -> peak {peak:.0f} MiB")
    for c in calls:
        c.cancel()
    for ch in channels:
        ch.close()
    assert max(opened) == 2 and 0 < max(held) <= 6 * 1024 * 1024, (opened, held)
    wait_for(lambda: gauge(requests.get(url, timeout=5).text, "embedding_stream_bytes") == 0, what="every byte given back")
    wait_for(lambda: canary(streaming, bearer(ALPHA)) < 5, what="a caller served after the streams")


def gauge(exposition: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in exposition.splitlines() if line.startswith(name + " "))


def test_streams_per_credential_are_bounded_and_idle_streams_end(streaming):
    """Issue 27.11: 1,024 idle keyed EmbedStreams filled server.max_concurrent_rpcs for everyone. A credential now holds
    at most limits.max_streams_per_credential streams (another credential is not affected), and a stream that sends
    nothing while nothing of its is in flight ends after limits.stream_idle_seconds."""
    from tei.v1 import tei_pb2, tei_pb2_grpc

    stop = threading.Event()

    def silent():
        while not stop.is_set():
            time.sleep(0.05)
        return
        yield  # noqa: B901 - a generator that sends nothing

    with grpc.insecure_channel(streaming.envoy_target) as ch:
        stub = tei_pb2_grpc.EmbedStub(ch)
        alpha = [("authorization", f"Bearer {ALPHA}")]
        held = [stub.EmbedStream(silent(), metadata=alpha, timeout=30) for _ in range(3)]
        time.sleep(0.5)
        fourth = stub.EmbedStream(iter([tei_pb2.EmbedRequest(inputs="hi")]), metadata=alpha, timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(fourth)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in e.value.details()
        other = list(stub.EmbedStream(iter([tei_pb2.EmbedRequest(inputs="hi")]), metadata=[("authorization", f"Bearer {CHARLIE}")], timeout=30))
        assert len(other) == 1 and len(other[0].embeddings) == 384
        # The silent ones end on their own once idle (2 s here).
        started = time.monotonic()
        for call in held:
            with pytest.raises(grpc.RpcError) as e:
                list(call)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_seconds" in e.value.details()
        assert time.monotonic() - started < 10
        stop.set()
        # Their places are free again.
        again = list(stub.EmbedStream(iter([tei_pb2.EmbedRequest(inputs="hi")]), metadata=alpha, timeout=30))
        assert len(again) == 1


def loop_canary(stub) -> float:
    """How long the server's event loop takes to answer a gRPC health check (no model work): its responsiveness."""
    started = time.perf_counter()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    return time.perf_counter() - started


def worst_loop_canary_while(stub, send, tries: int = 2) -> float:
    """The slowest health check answered while `send()` runs, the best of `tries`: a stall the work causes shows every
    time, a noisy neighbour does not."""
    worst = []
    for _ in range(tries):
        done = threading.Event()

        def run() -> None:
            try:
                send()
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        samples = []
        while not done.is_set():
            samples.append(loop_canary(stub))
            time.sleep(0.002)
        worst.append(max(samples) if samples else 0.0)
    return min(worst)


def test_large_answers_are_built_off_the_event_loop(stack):
    """Issue 27.4: answers whose size grows with the caller's input were built on the event loop, and every caller
    waited: TEI gRPC Tokenize of a 66,000-token text (a message per token) held the loop 380-470 ms, an EmbedAllStream
    of 512 texts ~105 ms, an 8 MiB Inworld :tokenize (its words counted on the loop) ~70-135 ms, and the tokenizer's
    single-text call held the GIL for a whole 200,000-character text. Now the answers are built in wire form with numpy
    or in an offload worker, the words counted in the tokenizer's thread, and a long text tokenized by the call that
    lets go of the GIL: the loop answers a health check within ~50 ms throughout."""
    from tei.v1 import tei_pb2, tei_pb2_grpc

    with grpc.insecure_channel(stack.server_targets[0]) as ch:
        tokenize, embed = tei_pb2_grpc.TokenizeStub(ch), tei_pb2_grpc.EmbedStub(ch)
        text = "ab " * 66_000
        work = {
            "tei grpc Tokenize": lambda: tokenize.Tokenize(tei_pb2.EncodeRequest(inputs=text), timeout=60),
            "tei grpc EmbedAllStream": lambda: list(embed.EmbedAllStream(
                iter([tei_pb2.EmbedAllRequest(inputs="word " * 250, truncate=True) for _ in range(96)]), timeout=60)),
            "inworld :tokenize 8 MiB": lambda: requests.post(stack.http_url + "/ml/v1alpha/embedding:tokenize",
                                                             json={"inputs": [{"text": "a " * 1000} for _ in range(4000)]}, timeout=60),
            "tei /tokenize": lambda: requests.post(stack.http_url + "/tokenize", json={"inputs": [("w%d " % i) * 50 for i in range(1000)]}, timeout=60),
        }
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(5):
            loop_canary(health)
        idle = statistics.median([loop_canary(health) for _ in range(20)])
        worst = {name: worst_loop_canary_while(health, send) for name, send in work.items()}
    print(f"\nidle health check {idle * 1000:.1f} ms; worst while: {({k: round(v * 1000) for k, v in worst.items()})} ms")
    for name, seconds in worst.items():
        assert seconds <= idle + 0.1, (name, round(seconds * 1000), "ms")


@pytest.mark.parametrize("ending", ["closed", "failed"])
def test_a_stream_that_ends_gives_back_every_byte(ending):
    """From a hostile review: a reader that had taken a message's bytes and waited for room in the inbox kept them when
    the stream ended (a caller cancelling, a failed input), so the budget all streams share shrank for good; and answers
    waiting for their turn were not counted at all. Whatever ends a stream, every byte comes back."""
    import asyncio

    from service import errors, streams
    from service.config import LimitsConfig

    MiB = 1 << 20
    server = streams.Streams(LimitsConfig(max_stream_bytes=4 * MiB, max_streams_bytes=6 * MiB))

    async def requests_():
        for _ in range(2000):
            yield b"x"
        yield b"y" * MiB  # taken, then waits for room in the full inbox

    async def run(group):
        if ending == "failed" and len(group) > 1:
            return [b"a" * 1000 for _ in group[:1]], errors.invalid_argument("one spoiled input")
        return [b"a" * 1000 for _ in group], None  # answers of 1,000 bytes: counted until sent

    async def main():
        stream = streams.in_order(requests_(), run, group_size=16, streams=server, size=len)
        await stream.__anext__()  # one answer read; the window and the inbox fill behind it
        await asyncio.sleep(0.3)
        during = server.budget.held
        if ending == "closed":
            await stream.aclose()
        else:
            with pytest.raises(errors.ServiceError):
                async for _ in stream:
                    pass
        await asyncio.sleep(0.1)
        return during, server.budget.held

    during, after = asyncio.run(main())
    assert during > 1000 and after == 0, (during, after)
