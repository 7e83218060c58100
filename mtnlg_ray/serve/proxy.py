"""What runs in Ray Serve's HTTP proxy: an ASGI middleware that ends a response whose replica died (and
router.py's, which names requests for prefix-affinity routing).

Why here and not in the app: once a replica has started a response (a stream's first SSE chunk),
the proxy has nothing to send if that replica's process dies. It drops the connection (Ray's
`send_http_response_on_exception` returns no messages once the response started), and the client
sees a broken chunked body (httpx `RemoteProtocolError`), with no `[DONE]` and no reason. The proxy
is the one process still alive on that connection, so the missing end is written there:

  * a started `text/event-stream` response that did not finish gets a last event
    `data: {"error": {"message", "type": "server_error", "param": null, "code": "replica_failed"}}`
    and `data: [DONE]`, then a proper end of body (what vLLM sends for an error mid-stream);
  * a request that got no response at all (its replica died before answering; the proxy would
    let uvicorn send a bare `500 Internal Server Error`) gets a 503 with an OpenAI error body and
    `Retry-After`, since Serve is replacing the replica.
A response that ended normally, a non-SSE body cut short (never seen: JSON bodies go out in one
message), websockets and lifespan pass through untouched. Cost: one Python call per message.

How it gets there: Ray's documented hook `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names a function
(`middlewares` below) that the proxy calls at start. The variable must be in the proxy actors'
environment. `CONTROLLER_OPTIONS` puts it in the Serve controller's `runtime_env.env_vars`; the
controller starts the proxies without a runtime_env of their own, so they inherit it. It is passed
by `deploy()` (`serve.start(controller_options=...)`) and is the top-level `controller_options`
block of the Serve config YAMLs (`serve run` / `serve deploy` / KubeRay's serveConfigV2 honor it).
Serve applies it only when it creates the controller: on a cluster whose Serve already runs
without it, streams cut by a dead replica end with a broken connection as before.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware

from mtnlg_ray.serve.router import PrefixKey

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "mtnlg_ray.serve.proxy:middlewares"
# The proxies also route on their own event loop (Serve's documented throughput setting), which saves a
# thread hand-off per streamed chunk.
PROXY_ENV = {CALLBACK_ENV: CALLBACK, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_PROXY_USE_GRPC": "1"}
CONTROLLER_OPTIONS = {"runtime_env": {"env_vars": PROXY_ENV}}
RETRY_AFTER_S = 5  # Serve restarts a replica in seconds (about 10 s for the test model on 2 cores)

MESSAGE = "the server replica handling this request stopped before finishing it (Serve is replacing it); retry"


def error_json() -> bytes:
    """The OpenAI error object (same shape as responses.error_body, kept import-light for the proxy)."""
    return json.dumps({"error": {"message": MESSAGE, "type": "server_error", "param": None,
                                 "code": "replica_failed"}}).encode()


class EndCutResponses:
    """Pure ASGI middleware: watch what the proxy sends; after the app returns, end what it left open."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = sse = finished = False

        async def watch(message):
            nonlocal started, sse, finished
            kind = message["type"]
            if kind == "http.response.start":
                started = True
                ctype = next((v for k, v in message.get("headers", ()) if k.lower() == b"content-type"), b"")
                sse = ctype.startswith(b"text/event-stream")
            elif kind == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watch)  # the proxy catches a replica's death itself and returns
        except Exception:
            if not finished:
                await self._end(send, started, sse)
            raise
        if not finished:
            await self._end(send, started, sse)

    @staticmethod
    async def _end(send, started: bool, sse: bool) -> None:
        if not started:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"retry-after", str(RETRY_AFTER_S).encode())]})
            await send({"type": "http.response.body", "body": error_json()})
        elif sse:
            body = b"data: " + error_json() + b"\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": body})
        # A client that already left ignores these sends (uvicorn drops writes after a disconnect).


def middlewares() -> list[Middleware]:
    """The proxy callback named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: this module's middleware,
    and router.py's, which names a generation request by its prompt's prefix for prefix-affinity routing."""
    return [Middleware(EndCutResponses), Middleware(PrefixKey)]
