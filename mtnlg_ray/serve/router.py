"""Prefix-affinity routing: requests whose prompts start alike go to the replica that has their prefix cached.

Each replica keeps its own prefix cache (prefix_cache.py), so with several replicas a shared system
prompt is only reused when its requests meet on one replica. Ray Serve's default router picks the
less loaded of two random replicas, which spreads them: with 2 replicas about half of the requests
after the first miss. Two pieces, both on the HTTP path in Serve's proxy:

  * `PrefixKey`, an ASGI middleware in the proxy (installed by proxy.middlewares()), reads the JSON
    body of a POST to /v1/completions or /v1/chat/completions, names its prompt's first
    PREFIX_CHARS characters (the `model` and, for chat, each message's role and content, in order)
    by a hash, and sets it as the request's `x-session-id` header, the header Serve copies into the
    request's routing metadata. A client's own `x-session-id` is kept (a chat session shares its
    prefix). The body is passed on unchanged.
  * `PrefixAffinityRouter`, the deployment's request router (Serve's RequestRouter API), ranks the
    replicas for a named request by rendezvous hashing of (name, replica id): every request with
    the same name prefers the same replica, names spread evenly over replicas, and when replicas
    come or go only the names of those replicas move. A preferred replica that is full (its
    `max_ongoing_requests`) is skipped for the next in that order. Unnamed requests (other routes,
    a body that is not JSON) get Serve's default choice: the less loaded of two random replicas.

Why a prefix of characters and not the cache's token blocks: the proxy has no tokenizer, and a name
must be known before a replica is chosen. 256 characters (about 64 tokens, 4 cache blocks of 16)
group the requests that share a system prompt or a few-shot preamble; prompts that differ earlier
are spread as before. Without the middleware (a Serve started without proxy.CONTROLLER_OPTIONS) the
router sees no names and routes as Serve's default does.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

PREFIX_CHARS = 256  # characters of a prompt that name it (about 64 tokens; see the module docstring)
MAX_BODY = 1 << 20  # bodies larger than this (bytes) are passed on unnamed instead of held in the proxy
ROUTES = (b"/v1/completions", b"/v1/chat/completions")
HEADER = b"x-session-id"  # Serve's session header (RAY_SERVE_SESSION_ID_HEADER_KEY's default)


def prefix_text(body: dict) -> str:
    """The text that stands for a request body's prompt: `model`, then the prompt (completions: the first
    prompt, token ids as numbers) or the messages' roles and contents (chat), at least its first
    PREFIX_CHARS characters (what `prefix_key` hashes)."""
    parts = [str(body.get("model", ""))]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: the first names it
    if isinstance(prompt, str):
        parts.append(prompt[:PREFIX_CHARS])
    elif isinstance(prompt, list):  # token ids: each at least one character
        parts.append(",".join(str(t) for t in prompt[:PREFIX_CHARS]))
    length = sum(map(len, parts))
    for m in body.get("messages") or ():
        if length >= PREFIX_CHARS:  # the name is made of the first PREFIX_CHARS characters only
            break
        if isinstance(m, dict):
            content = m.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role')}>{content}")
            length += len(parts[-1]) + 1
    return "\x00".join(parts)


def prefix_key(body: Any) -> str | None:
    """The routing name of a request body (None: not a JSON object)."""
    if not isinstance(body, dict):
        return None
    return "prefix-" + hashlib.sha1(prefix_text(body)[:PREFIX_CHARS].encode()).hexdigest()[:16]


class PrefixKey:
    """Pure ASGI middleware for Serve's proxy: name a generation request by its prompt's prefix."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers", ()) if scope["type"] == "http" else ()
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").encode() not in ROUTES
                or any(k.lower() == HEADER for k, _ in headers)):
            await self.app(scope, receive, send)
            return
        held, size = [], 0  # the body's messages, replayed to the proxy in order
        while True:
            message = await receive()
            held.append(message)
            if message["type"] != "http.request":
                break  # the client left: the proxy sees it too
            size += len(message.get("body", b""))
            if not message.get("more_body", False) or size > MAX_BODY:
                break
        key = None
        if held[-1]["type"] == "http.request" and not held[-1].get("more_body", False):
            try:
                key = prefix_key(json.loads(b"".join(m.get("body", b"") for m in held)))
            except Exception:  # not JSON, nested too deeply, odd field types: unnamed; the replica gives the 400
                pass
        if key is not None:
            scope = {**scope, "headers": [*headers, (HEADER, key.encode())]}

        async def replay():
            return held.pop(0) if held else await receive()

        await self.app(scope, replay, send)


def rendezvous_order(key: str, replicas: list, name=lambda r: r) -> list:
    """`replicas` by descending hash of (key, name(replica)): highest random weight (rendezvous) hashing."""
    def weight(r) -> bytes:
        return hashlib.blake2b(f"{key}|{name(r)}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Serve request router: a named request's replicas in rendezvous order, each a rank of its own (Serve
    takes the first that has room); an unnamed one gets two random replicas, the less loaded chosen."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = rendezvous_order(key, candidate_replicas, lambda r: r.replica_id.unique_id)
        return [[r] for r in ranked]
