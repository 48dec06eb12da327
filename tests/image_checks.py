"""Clients of the image's container, run inside the test's network namespace (tests/image.py `Netns.check`):
`python -m tests.image_checks CHECK JSON-ARGS` prints its answer as JSON.

Each API is called through its own client library where it has one (openai, ollama, cohere, google-genai,
huggingface_hub, gRPC stubs), else as its documentation shows (plain HTTP).
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sys
import threading
import time

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT = "The image serves every API."


def dialects(host: str, port: int, key: str, inworld_key: str, inworld_secret: str) -> dict:
    """Every API, one text each: its vector (or the error), by dialect."""
    import cohere
    import grpc
    import ollama
    import openai
    import requests
    from google import genai
    from google.genai import types
    from huggingface_hub import InferenceClient

    from ai.inworld.embedding.v1alpha import embedding_service_pb2 as pb
    from ai.inworld.embedding.v1alpha import embedding_service_pb2_grpc as pb_grpc

    url = f"http://{host}:{port}"
    bearer = {"Authorization": f"Bearer {key}"}
    basic = "Basic " + base64.b64encode(f"{inworld_key}:{inworld_secret}".encode()).decode()
    calls = {
        "openai": lambda: openai.OpenAI(base_url=f"{url}/v1", api_key=key).embeddings.create(model=MODEL, input=TEXT).data[0].embedding,
        "aigne": lambda: requests.post(f"{url}/api/embeddings", json={"model": MODEL, "input": TEXT}, headers=bearer, timeout=60).json()["data"][0]["embedding"],
        "tei": lambda: requests.post(f"{url}/embed", json={"inputs": TEXT}, headers=bearer, timeout=60).json()[0],
        "ollama": lambda: ollama.Client(host=url, headers=bearer).embed(model=MODEL, input=TEXT).embeddings[0],
        "cohere": lambda: cohere.ClientV2(api_key=key, base_url=url).embed(
            model=MODEL, texts=[TEXT], input_type="search_document", embedding_types=["float"]).embeddings.float_[0],
        "gemini": lambda: _gemini(genai.Client(api_key=key, http_options=types.HttpOptions(base_url=url))),
        "huggingface": lambda: InferenceClient(model=f"{url}/models/{MODEL}", token=key).feature_extraction(TEXT)[0].tolist(),
        "hrflow": lambda: _hrflow(url, key),
        "inworld": lambda: requests.post(f"{url}/ml/v1alpha/embedding:embed", json={"inputs": [{"text": TEXT}], "model": {"model": MODEL}},
                                         headers={"Authorization": basic}, timeout=60).json()["embeddings"][0]["values"],
        "grpc": lambda: _grpc(f"{host}:{port}", key, pb, pb_grpc, grpc),
    }
    out = {}
    for name, call in calls.items():
        try:
            out[name] = {"vector": [float(x) for x in call()]}
        except Exception as e:  # noqa: BLE001 - reported to the test, which names the dialect
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def _gemini(client) -> list[float]:
    # The client closes its connections when it is collected: held here for the call.
    return client.models.embed_content(model=MODEL, contents=TEXT).embeddings[0].values


def _hrflow(url: str, key: str) -> list[float]:
    import numpy as np
    import requests

    # An item whose `text` field is the text embedded; the answer is base64 of big-endian float32s (HrFlow's decoder).
    r = requests.post(f"{url}/v1/document/embedding", json={"item_type": "job", "item": json.dumps({"text": TEXT})},
                      headers={"X-API-KEY": key, "X-USER-EMAIL": "image@example.com"}, timeout=60)
    return np.frombuffer(base64.b64decode(r.json()["data"]), dtype=">f4").tolist()


def _grpc(target: str, key: str, pb, pb_grpc, grpc) -> list[float]:
    with grpc.insecure_channel(target) as ch:
        reply = pb_grpc.EmbeddingServiceStub(ch).Embed(
            pb.EmbedRequest(inputs=[pb.EmbedRequest.Input(text=TEXT)], model=pb.ModelId(model=MODEL)),
            metadata=[("authorization", f"Bearer {key}")], timeout=60)
    return list(reply.embeddings[0].values)


def get(host: str, port: int, path: str, headers: dict | None = None) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode(errors="replace")[:20000], "headers": dict(r.getheaders())}
    except OSError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def post(host: str, port: int, path: str, body: dict, headers: dict | None = None) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode(errors="replace")[:4000]}
    except OSError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()


def load(host: str, port: int, key: str, workers: int, seconds: float) -> dict:
    """Requests from `workers` callers, one after the other, each on a new connection, for up to `seconds` or until
    the service is gone (connections refused for 3 s). Prints `started` once 20 have been answered. Each request is
    classified: ok (200 and a vector), refused (the connection was refused: never accepted), unavailable (a clean
    503: the caller is told to retry elsewhere), or lost (anything else: a reset, a cut answer, a timeout)."""
    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    refused_since: list[float] = []
    body = json.dumps({"model": MODEL, "input": ["drain " + "word " * 30]})

    def one() -> dict:
        sent = time.time()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            try:
                conn.connect()
            except ConnectionRefusedError:
                return {"sent": sent, "done": time.time(), "kind": "refused"}
            conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            data = r.read()
            if r.status == 200 and len(json.loads(data)["data"][0]["embedding"]) == 384:
                kind = "ok"
            elif r.status == 503:
                kind = "unavailable"
            else:
                kind = f"lost: {r.status} {data[:200]!r}"
            return {"sent": sent, "done": time.time(), "kind": kind}
        except (OSError, http.client.HTTPException, ValueError) as e:
            return {"sent": sent, "done": time.time(), "kind": f"lost: {type(e).__name__}: {e}"}
        finally:
            conn.close()

    def worker() -> None:
        while not stop.is_set():
            res = one()
            with lock:
                results.append(res)
                if res["kind"] == "refused":
                    refused_since.append(res["done"])
                    if res["done"] - refused_since[0] > 3:
                        stop.set()
                else:
                    refused_since.clear()
                if sum(1 for x in results if x["kind"] == "ok") == 20 * 1 and not getattr(worker, "said", False):
                    worker.said = True  # type: ignore[attr-defined]
                    print("started", flush=True)
            if res["kind"] == "refused":
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    deadline = time.time() + seconds
    while time.time() < deadline and not stop.is_set():
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    return {"results": results}


def refused_connection(host: str, port: int) -> dict:
    """Whether a TCP connection to host:port is refused (nothing listens there)."""
    try:
        socket.create_connection((host, port), timeout=3).close()
        return {"refused": False}
    except ConnectionRefusedError:
        return {"refused": True}
    except OSError as e:
        return {"refused": False, "error": str(e)}


CHECKS = {"dialects": dialects, "get": get, "post": post, "load": load, "refused_connection": refused_connection}

if __name__ == "__main__":
    answer = CHECKS[sys.argv[1]](**json.loads(sys.argv[2]))
    print(json.dumps(answer))
