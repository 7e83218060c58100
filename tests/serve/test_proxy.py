"""The proxy middleware, without Ray: it ends what a dead replica left open and passes the rest through.
(The real case, a replica killed mid-stream behind Serve's proxy, is in test_app.py.)"""

from __future__ import annotations

import asyncio
import json

import yaml

from mtnlg_ray.serve.proxy import CALLBACK, CONTROLLER_OPTIONS, PROXY_ENV, EndCutResponses
from mtnlg_ray.serve.router import PrefixKey

SSE_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
JSON_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}


def run(app, scope_type: str = "http") -> list[dict]:
    """Messages the middleware sends for one request to `app` (an ASGI callable standing in for the proxy)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(EndCutResponses(app)({"type": scope_type}, receive, send))
    return sent


def proxy_sending(*messages):
    async def app(scope, receive, send):  # what Serve's proxy does: sends what the replica sent, then returns
        for m in messages:
            await send(m)
    return app


def body_of(sent) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_cut_stream_ends_with_an_error_event_and_done():
    chunk = b'data: {"choices": [{"text": "x"}]}\n\n'
    sent = run(proxy_sending(SSE_START, {"type": "http.response.body", "body": chunk, "more_body": True}))
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)
    events = body_of(sent).decode().split("\n\n")
    assert events[0] == chunk.decode().strip() and events[2:] == ["data: [DONE]", ""]
    err = json.loads(events[1].removeprefix("data: "))["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "replica_failed"


def test_no_response_at_all_becomes_a_503_openai_error():
    sent = run(proxy_sending())
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"5"
    assert json.loads(body_of(sent))["error"]["type"] == "server_error"


def test_finished_responses_and_other_scopes_pass_through_untouched():
    done = [SSE_START, {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}]
    assert run(proxy_sending(*done)) == done
    cut_json = [JSON_START, {"type": "http.response.body", "body": b'{"a"', "more_body": True}]
    assert run(proxy_sending(*cut_json)) == cut_json  # not SSE: nothing sensible to append
    assert run(proxy_sending(), scope_type="lifespan") == []


def test_the_callback_is_what_serve_loads_and_the_yamls_name_it():
    from pathlib import Path

    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path
    from ray.serve.config import ControllerOptions

    mws = validate_http_proxy_callback_return(call_function_from_import_path(CALLBACK))  # Serve's own checks
    assert [m.cls for m in mws] == [EndCutResponses, PrefixKey]
    ControllerOptions.model_validate(CONTROLLER_OPTIONS)
    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "jobs/configs/serve/serve_config.yaml").read_text())
    service = yaml.safe_load_all((root / "clusters/kuberay/rayservice.yaml").read_text())
    v2 = yaml.safe_load(next(d for d in service if d and d.get("kind") == "RayService")["spec"]["serveConfigV2"])
    for cfg in (config, v2):
        assert cfg["controller_options"]["runtime_env"]["env_vars"] == PROXY_ENV  # what `mtnlg serve` sets
