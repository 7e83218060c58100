"""Prefix-affinity routing: the proxy middleware's names and body replay, the rendezvous order, and on a
real 2-replica deployment that every request after the first of its prefix finds that prefix cached."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from mtnlg_ray.serve.router import HEADER, PREFIX_CHARS, PrefixKey, prefix_key, rendezvous_order

SYSTEM = "You are a careful Python reviewer. Answer with one short paragraph and one code block. " * 4


def test_prefix_key_names_the_prompts_start_model_and_messages():
    long = SYSTEM + "x" * PREFIX_CHARS
    assert prefix_key({"model": "m", "prompt": long + "a"}) == prefix_key({"model": "m", "prompt": long + "b"})
    assert prefix_key({"model": "m", "prompt": "a" + long}) != prefix_key({"model": "m", "prompt": "b" + long})
    assert prefix_key({"model": "m", "prompt": long}) != prefix_key({"model": "sql", "prompt": long})  # adapters
    assert prefix_key({"model": "m", "prompt": [long, "z"]}) == prefix_key({"model": "m", "prompt": long})
    assert prefix_key({"prompt": [1, 2, 3]}) != prefix_key({"prompt": [1, 2, 4]})
    chat = [{"role": "system", "content": long}]
    assert prefix_key({"messages": chat + [{"role": "user", "content": "q1"}]}) == \
        prefix_key({"messages": chat + [{"role": "user", "content": [{"type": "text", "text": "q2"}]}]})
    assert prefix_key({"messages": [{"role": "user", "content": long}]}) != prefix_key({"messages": chat})
    assert prefix_key([1, 2]) is None


def run_middleware(method: str, path: str, chunks: list[bytes], headers=()) -> tuple[dict, bytes]:
    """(the scope the app behind PrefixKey saw, the body it read) for a request sent in `chunks`."""
    seen = {}

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body", False):
                break
        seen.update(scope=scope, body=body)

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(PrefixKey(app)(scope, receive, None))
    return seen["scope"], seen["body"]


def test_middleware_names_generation_requests_and_passes_their_bodies_on_unchanged():
    body = json.dumps({"model": "m", "prompt": SYSTEM}).encode()
    scope, seen = run_middleware("POST", "/v1/completions", [body[:10], body[10:]])
    assert seen == body and dict(scope["headers"])[HEADER] == prefix_key(json.loads(body)).encode()
    scope, _ = run_middleware("POST", "/v1/completions", [body], headers=[(b"X-Session-Id", b"mine")])
    assert scope["headers"] == [(b"X-Session-Id", b"mine")]  # the client's own session wins
    odd = [b"{not json"], [b"[" * 30000 + b"]" * 30000], [b'{"messages": [{"content": [{"text": 5}]}]}']
    for method, path, chunks in (*(("POST", "/v1/completions", c) for c in odd), ("GET", "/v1/models", [b""]),
                                 ("POST", "/tokenize", [body])):
        scope, seen = run_middleware(method, path, chunks)
        assert HEADER not in dict(scope["headers"]) and seen == b"".join(chunks)


def test_rendezvous_order_spreads_names_and_moves_only_a_removed_replicas():
    keys = [f"prefix-{i}" for i in range(400)]
    first = {k: rendezvous_order(k, ["a", "b", "c"])[0] for k in keys}
    assert all(80 < list(first.values()).count(r) < 190 for r in "abc")
    after = {k: rendezvous_order(k, ["a", "b"])[0] for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != "c")


@pytest.fixture(scope="module")
def url(ray_session, tiny_checkpoint, serve_port):
    from ray import serve

    from mtnlg_ray.config import ServeJob
    from mtnlg_ray.serve.deploy import deploy

    job = ServeJob.model_validate({"serve": {
        "checkpoint": str(tiny_checkpoint), "port": serve_port, "num_cpus": 0.5, "max_batch_slots": 2,
        "max_waiting": 4, "max_ongoing_requests": 6, "prefix_cache_blocks": 256,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2}}})
    try:
        yield deploy(job, name="router")
    finally:
        serve.shutdown()


def test_requests_sharing_a_prefix_meet_on_the_replica_that_cached_it(url):
    from ray import serve

    replicas = set()
    with httpx.Client(base_url=url, timeout=60) as http:
        for round_ in range(3):
            for p in range(6):  # 6 system prompts, each asked 3 questions
                body = {"model": "mtnlg", "prompt": f"# project {p}\n{SYSTEM}\n# question {round_}: ", "max_tokens": 1}
                usage = http.post("/v1/completions", json=body).json()["usage"]
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                # Serve's default router would send about half of the repeats to the other replica
                assert cached > 0 if round_ else cached == 0, (p, round_, usage)
        for _ in range(8):
            replicas.add(serve.get_app_handle("router").replica_info.remote().result(timeout_s=30)["pid"])
    assert len(replicas) == 2
