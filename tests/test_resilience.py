"""Staying up: backpressure answers 429 at once, deadlines, graceful drain, and losing a replica under load."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time

import grpc
import numpy as np
import pytest
import requests

from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc
from service.launch import Stack, free_port

from .conftest import stack_config

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LONG = " ".join(["hello"] * 80)  # 82 tokens: long, but within the model's 256


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    """A server with a small queue and few concurrent requests, to reach the limits on purpose."""
    cfg = stack_config()
    cfg.limits.max_queued_tokens = 1500
    cfg.limits.max_concurrent_requests = 6
    with Stack(cfg.validate(), log_dir=tmp_path_factory.mktemp("tight-logs")) as s:
        yield s


def test_a_stacks_envoy_shares_no_memory_with_other_envoys(tight):
    """Hot restart is off, as in the pod: its shared memory outlived every Envoy in /dev/shm, and its --base-id had to
    differ from every other Envoy's on the machine."""
    maps = open(f"/proc/{tight.envoy.pid}/maps").read()
    assert "/dev/shm/" not in maps


def test_overload_is_a_fast_429_with_retry_after_in_each_dialect(tight):
    def openai(i):
        t0 = time.perf_counter()
        r = requests.post(tight.http_url + "/v1/embeddings", json={"input": [f"{LONG} {i} {j}" for j in range(16)], "model": MODEL}, timeout=60)
        return r, time.perf_counter() - t0

    with cf.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(openai, range(24)))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes, codes
    for r, seconds in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            assert seconds < 5  # refused at once, not after a timeout

    def hf(i):
        return requests.post(f"{tight.http_url}/models/{MODEL}", json={"inputs": [f"{LONG} hf {i} {j}" for j in range(16)]}, timeout=60)

    with cf.ThreadPoolExecutor(24) as pool:
        refused = [r for r in pool.map(hf, range(24)) if r.status_code == 429]
    assert refused and all(isinstance(r.json()["error"], str) for r in refused)


def test_grpc_overload_is_resource_exhausted(tight):
    with grpc.insecure_channel(tight.server_targets[0]) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        calls = [
            stub.Embed.future(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=f"{LONG} g {i} {j}") for j in range(16)]), timeout=60)
            for i in range(24)
        ]
        codes = []
        for c in calls:
            try:
                c.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


def test_a_request_the_caps_must_refuse_is_a_400_even_when_the_queue_is_full(tight):
    """A 429 says "retry": a request that can never succeed must not get one because the server happened to be busy."""
    over_windows = {"input": [[1000 + i] * 600 for i in range(1800)], "model": MODEL}  # > 1,024 windows of 256
    over_one = {"input": [[2000] * 9000], "model": MODEL}  # > limits.max_input_tokens
    stop = threading.Event()

    def load(i):  # keeps the small queue holding tokens: a large request admitted on its size would be overload
        n = 0
        while not stop.is_set():
            requests.post(tight.http_url + "/v1/embeddings", json={"input": [f"{LONG} busy {i} {n} {j}" for j in range(4)], "model": MODEL}, timeout=60)
            n += 1

    with cf.ThreadPoolExecutor(3) as pool:  # 3 of the 6 concurrent calls
        loaders = [pool.submit(load, i) for i in range(3)]
        time.sleep(0.5)
        try:
            for _ in range(4):
                for body, code in ((over_windows, "TOO_MANY_WINDOWS"), (over_one, "INPUT_TOO_LONG")):
                    r = requests.post(tight.http_url + "/v1/embeddings", json=body, timeout=60, headers={"X-Token-Ids": "model"})
                    assert r.status_code == 400, (code, r.status_code, r.text[:300])
                    assert "limits.max_" in r.json()["error"]["message"], r.text[:300]
        finally:
            stop.set()
        for f in loaders:
            f.result()


def test_an_expired_deadline_is_deadline_exceeded_and_others_are_unharmed(tight):
    with grpc.insecure_channel(tight.server_targets[0]) as ch:
        stub = pb_grpc.EmbeddingServiceStub(ch)
        busy = stub.Embed.future(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=f"{LONG} busy {j}") for j in range(12)]), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="late")]), timeout=0.001)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(busy.result().embeddings) == 12


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    with Stack(stack_config(), log_dir=tmp_path) as s:
        with grpc.insecure_channel(s.server_targets[0]) as ch:
            stub = pb_grpc.EmbeddingServiceStub(ch)
            in_flight = stub.Embed.future(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=f"{LONG} drain {j}") for j in range(64)]), timeout=60)
            time.sleep(0.05)
            s.stop_server(0, signal.SIGTERM)
            assert len(in_flight.result().embeddings) == 64  # finished, not cut off
            assert s.servers[0].wait(30) == 0  # then exited, cleanly, within the grace period
        assert "draining" in s.logs(tail=None)


def test_losing_one_of_two_replicas_under_load_loses_no_request(tmp_path):
    """A replica that dies (SIGKILL, no drain) loses nothing: Envoy retries on the other one every request the dead
    one had not begun to answer, and keeps the rest off it. What Envoy cannot retry is a response whose headers had
    left the replica when it died (a few milliseconds of each request): those few are a 503 that the caller's own
    retry covers, as every SDK retries a 503. So the client here retries a 503 once, as the OpenAI SDK would, and
    at most the requests in flight at the kill (8 clients) may need it."""
    cfg = stack_config()
    with Stack(cfg, replicas=2, log_dir=tmp_path) as s:
        texts = [f"replica test sentence number {i}" for i in range(24)]
        first = requests.post(s.http_url + "/v1/embeddings", json={"input": texts, "model": MODEL, "encoding_format": "float"}, timeout=60)
        want = {t: np.array(d["embedding"]) for t, d in zip(texts, first.json()["data"])}
        body = lambda text: {"input": [text, "steady load"], "model": MODEL, "encoding_format": "float"}  # noqa: E731

        stop = threading.Event()

        def client(k):  # sends until told to stop: the load runs on well past the kill, however fast the replicas are
            done, i = [], k
            while not stop.is_set():
                text = texts[i % len(texts)]
                i += 8
                r = requests.post(s.http_url + "/v1/embeddings", json=body(text), timeout=60)
                if r.status_code != 503:
                    done.append((text, r, False))
                else:
                    done.append((text, requests.post(s.http_url + "/v1/embeddings", json=body(text), timeout=60), True))
            return done

        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, k) for k in range(8)]
            time.sleep(1.0)
            s.stop_server(1, signal.SIGKILL)  # no drain: the replica just dies
            time.sleep(2.0)
            stop.set()
            results = [one for f in futures for one in f.result()]
        retried_by_envoy = sum(int(line.rsplit(" ", 1)[1]) for line in requests.get(s.admin_url + "/stats").text.splitlines()
                               if line.startswith("cluster.embedding_grpc.upstream_rq_retry:"))
    failures = [(t, r.status_code, r.text[:200]) for t, r, _ in results if r.status_code != 200]
    assert not failures, failures
    retried_by_client = sum(again for _, _, again in results)
    assert retried_by_client <= 8, retried_by_client
    assert retried_by_envoy > 0  # the kill did land on requests, and Envoy moved them
    for text, r, _ in results:  # and nobody got somebody else's vector
        assert np.abs(np.array(r.json()["data"][0]["embedding"]) - want[text]).max() <= 1e-5


def test_a_draining_replica_closes_keep_alive_connections(tmp_path):
    """kube-proxy never moves an open connection: a keep-alive client of a draining pod must be told to reconnect
    (and its next connection goes to another replica) before the drain delay ends and new calls are refused."""
    import http.client

    cfg = stack_config()
    cfg.server.drain_delay_seconds = 3.0
    cfg.envoy.admin_port = free_port()
    cfg.server.sidecar_admin_url = f"http://127.0.0.1:{cfg.envoy.admin_port}"  # as a pod's server has it
    with Stack(cfg.validate(), log_dir=tmp_path) as s:
        conn = http.client.HTTPConnection("127.0.0.1", s.config.envoy.listen_port, timeout=30)
        body = '{"input": "keep alive", "model": "%s"}' % MODEL
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and (first.getheader("connection") or "").lower() != "close"
        s.stop_server(0, signal.SIGTERM)
        time.sleep(0.5)  # draining, within the delay: still answered, and told to go
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        second = conn.getresponse()
        second.read()
        assert second.status == 200
        assert (second.getheader("connection") or "").lower() == "close"
        r = requests.get(s.ready_url, timeout=5)
        assert r.status_code == 503  # and the replica is out of the Service at once, not after a health check
        conn.close()


def test_a_start_that_fails_after_spawning_leaves_no_process(tmp_path, monkeypatch):
    """A failure between spawning the servers and Envoy being up (here: rendering Envoy's configuration) stops the
    servers already started; before, they outlived the failed start."""
    import service.launch as launch

    spawned = []
    real_popen = launch.subprocess.Popen

    def recording_popen(*args, **kwargs):
        spawned.append(real_popen(*args, **kwargs))
        return spawned[-1]

    def broken_render(*_args, **_kwargs):
        raise ValueError("rendering failed")

    monkeypatch.setattr(launch.subprocess, "Popen", recording_popen)
    monkeypatch.setattr(launch.envoy, "render", broken_render)
    with pytest.raises(ValueError, match="rendering failed"):
        Stack(stack_config().validate(), log_dir=tmp_path).start()
    assert spawned, "the server was spawned before Envoy's configuration"
    assert all(p.poll() is not None for p in spawned)


def test_ports_handed_to_later_listeners_are_outside_the_ephemeral_range():
    """A port picked now and bound seconds later by a server or Envoy must not be one the kernel may give an outgoing
    connection meanwhile (CI lost a run to `cannot bind 127.0.0.1:56789: Address already in use`); nor may two stacks
    of one process be handed the same port before either binds it."""
    import socket

    low, high = (int(v) for v in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and it was free


def test_readiness_follows_the_servers_health_not_only_its_drain(tmp_path):
    """Envoy's readiness listener is 200 only while the local server is SERVING: a server up but without its model
    (here: a lazy default model, not loaded until asked for) keeps the pod out of the Service; the listener answers
    nothing but its health path."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cfg = stack_config()
    cfg.models[0].load = "lazy"
    s = Stack(cfg.validate(), log_dir=tmp_path)
    try:
        s._spawn()
        [target] = s.server_targets
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            end = time.monotonic() + 60
            while True:  # the server answers, NOT_SERVING: its model is not loaded
                try:
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.NOT_SERVING
                    break
                except grpc.RpcError:
                    assert time.monotonic() < end, s.logs()
                    time.sleep(0.2)
            end = time.monotonic() + 30
            while True:  # Envoy is up (its readiness listener answers)
                try:
                    first = requests.get(s.ready_url, timeout=2)
                    break
                except requests.ConnectionError:
                    assert time.monotonic() < end, s.logs()
                    time.sleep(0.2)
            statuses = [first.status_code]
            for _ in range(8):  # several of Envoy's health-check intervals (2 s)
                time.sleep(0.5)
                statuses.append(requests.get(s.ready_url, timeout=2).status_code)
            assert set(statuses) == {503}, statuses
            base = s.ready_url.rsplit("/", 1)[0]
            assert requests.get(base + "/stats", timeout=2).status_code == 404
            assert requests.get(base + "/healthcheck/fail", timeout=2).status_code == 404
            stub = pb_grpc.EmbeddingServiceStub(channel)  # the first request loads the model
            stub.Embed(pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text="wake up")]), timeout=120)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        end = time.monotonic() + 15
        while requests.get(s.ready_url, timeout=2).status_code != 200:
            assert time.monotonic() < end, "the server is SERVING but Envoy's readiness never turned 200"
            time.sleep(0.2)
    finally:
        s.stop()


async def test_a_model_down_for_good_takes_the_whole_server_out_so_the_pod_is_replaced(tmp_path):
    """A batcher that died past its restart limit never comes back. For the default model the server's health
    already stays NOT_SERVING; for another model it must too, or the replica serves on with one model dead and the
    liveness probe (the server's health) never replaces it. A death it recovers from leaves the server serving."""
    import asyncio

    from grpc_health.v1 import health_pb2

    from service.config import ModelConfig
    from service.server import EmbeddingServer

    cfg = stack_config()
    (tmp_path / "modules.json").write_text("[]")
    cfg.models.append(ModelConfig(id="second-model", path=str(tmp_path), load="lazy"))
    server = EmbeddingServer(cfg.validate())
    server._loop = asyncio.get_running_loop()
    OK, DOWN = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def status(name: str) -> int:
        await asyncio.sleep(0.05)  # the health updates are scheduled onto the loop from the batcher's thread
        return (await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)).status

    try:
        for name in ["", *server.service_names, "model:second-model", f"model:{server.registry.default_id}"]:
            await server.health.set(name, OK)
        await asyncio.to_thread(server._model_failed, "second-model", False)
        assert await status("model:second-model") == DOWN
        assert await status("") == OK and await status(server.service_names[0]) == OK
        await asyncio.to_thread(server._model_failed, "second-model", True)
        assert await status("") == DOWN
        assert all([await status(name) == DOWN for name in server.service_names])
        assert await status(f"model:{server.registry.default_id}") == OK  # the default model itself is fine
        # The default model recovering from a death of its own (or loading late) must not undo it.
        ready = type("Ready", (), {"id": server.registry.default_id})()
        await asyncio.to_thread(server._model_failed, server.registry.default_id, False)
        await asyncio.to_thread(server._model_ready, ready)
        assert await status(f"model:{server.registry.default_id}") == OK
        assert await status("") == DOWN and await status(server.service_names[0]) == DOWN
    finally:
        server.executor.shutdown()
