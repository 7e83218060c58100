"""The OpenAI-compatible HTTP server: a FastAPI ingress on a Ray Serve deployment (the only file that knows HTTP).

Routes: POST /v1/completions, POST /v1/chat/completions (SSE with `stream: true`, ending in
`data: [DONE]`), GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics.
Every error is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with
400 (bad field), 401 (API key), 404 (model, route), 413 (body size) or 503 (overloaded: engine
queue or Serve's max_queued_requests, both with Retry-After; a dead engine); a request never
produces a 500. When MTNLG_API_KEY is set in the replica, every route but /health needs
`Authorization: Bearer <key>`. A client that disconnects cancels its generation (its rows free).

A replica is two processes: this one (FastAPI routes, tokenizer, validation, rendering, metrics)
and its engine process (engine_process.py: the model, the KV cache, continuous batching), so the
per-chunk Python here never holds up a decode step. If the engine process dies, its requests end
with an error and check_health fails (Serve replaces the replica); if this process dies, Serve's
proxy ends its open streams with an error event (proxy.py) and the engine process exits.

Deployed by deploy.py: `build_app(ServeJob)` (Serve config YAML: `import_path: mtnlg_ray.serve.deploy:build_app`)
or `mtnlg serve CHECKPOINT` (`run_serve`).
"""

import hmac
import json
import logging
import math
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtnlg_ray.config import ServeSection
from mtnlg_ray.data.chat import chat_stop_id, encode_chat
from mtnlg_ray.data.tokenizer import load_tokenizer
from mtnlg_ray.serve.async_engine import Group
from mtnlg_ray.serve.engine import EngineDead, QueueFull
from mtnlg_ray.serve.engine_process import ProcessEngine
from mtnlg_ray.serve.metrics import ServeMetrics, Tracker
from mtnlg_ray.serve.render import Choice, Renderer, new_id, usage
from mtnlg_ray.serve.schemas import (ChatCompletionChunk, ChatCompletionRequest, CompletionRequest, CompletionResponse,
                                     DetokenizeRequest, ModelCard, ModelList, TokenizeRequest, error_body)

log = logging.getLogger(__name__)
TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic union-branch names in error locations


class APIError(Exception):
    """An HTTP error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return JSONResponse(error_body(self.message, kind, self.param, self.code), self.status, headers=self.headers)


api = FastAPI(title="mtnlg OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(request, exc: APIError):
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError):
    return APIError(400, str(exc.errors()[0].get("msg")), code="invalid_value").response()


@api.exception_handler(Exception)
async def _bug(request, exc: Exception):  # not a user mistake: still an OpenAI body, and logged
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()


def _param(loc: tuple) -> str:
    """Dotted field path of a pydantic error location, without union-branch tags ('str', 'list[int]')."""
    parts = [str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p.islower() and p not in TAGS)]
    return ".".join(parts)


def _validation_message(err: ValidationError) -> APIError:
    e = err.errors()[0]
    param = _param(e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    elif e["type"] == "missing":
        msg = "required field is missing"
    elif isinstance(e.get("input"), (int, float, str, bool)) and "got" not in msg:
        msg = f"{msg} (got {json.dumps(e['input'])[:80]})"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param or None, code="invalid_value")


def _sse(obj: BaseModel | dict) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


@serve.deployment(name="OpenAIServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(api)
class OpenAIServer:
    """One replica: the model, its continuous-batching engine, and the OpenAI routes."""

    def __init__(self, serve_config: dict):
        cfg = self.cfg = ServeSection.model_validate(serve_config)
        device = cfg.device if cfg.device != "auto" else ("auto" if cfg.num_gpus else "cpu")
        # The model and its engine live in a child process (engine_process.py); this one does HTTP.
        self.engine = ProcessEngine(cfg.checkpoint, device, cfg.max_batch_slots, cfg.max_context, cfg.max_waiting)
        self.tok = load_tokenizer(self.engine.tokenizer_path)
        self.context = self.engine.max_context
        self.metrics = ServeMetrics(self.engine)
        self.engine.on_step = self.metrics.on_step
        self.render = Renderer(self.tok, cfg.model_name)
        self.eod, self.chat_stop = self.tok.eod_id, chat_stop_id(self.tok)
        self.api_key = os.environ.get("MTNLG_API_KEY") or None
        log.info("serving %s (%s) on %s: %d rows x %d tokens, engine process %d", cfg.model_name, cfg.checkpoint,
                 self.engine.device, cfg.max_batch_slots, self.context, self.engine.pid)

    def check_health(self) -> None:
        """Serve calls this periodically; raising (a dead engine loop) gets the replica replaced."""
        self.engine.check_health()

    def replica_info(self) -> dict:
        """Process ids and engine load of this replica (for operators and tests, via a handle)."""
        e = self.engine
        return {"pid": os.getpid(), "engine_pid": e.pid, "running": e.num_running, "waiting": e.num_waiting,
                "in_flight": e.in_flight, "free_rows": e.free_rows}

    def __del__(self):
        self.engine.shutdown()

    # ------------------------------------------------------------------------------ request edge
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _body(self, request: Request, model_cls: type[BaseModel]) -> Any:
        """Authenticate, bound the size, decode UTF-8 and JSON, validate: each failure a clear 4xx."""
        self._auth(request)
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            data = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise APIError(400, f"request body is not valid UTF-8 (byte {err.start})", code="invalid_encoding")
        except json.JSONDecodeError as err:
            raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json")
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_json")
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(data)
        except ValidationError as err:
            raise _validation_message(err) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server has `{self.cfg.model_name}`)",
                           param="model", code="model_not_found")

    def _prompt(self, ids: list[int], truncate: int | None, param: str) -> list[int]:
        """Validate a prompt's token ids against the vocabulary and the context (the 400 states the numbers)."""
        C = self.context
        if truncate is not None:
            if truncate >= C:
                raise APIError(400, f"truncate_prompt_tokens={truncate} must be less than the context of {C} "
                               f"tokens", param="truncate_prompt_tokens", code="invalid_value")
            ids = ids[-truncate:]
        if not ids:
            raise APIError(400, f"{param}: the prompt has no tokens", param=param, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < self.tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {self.tok.vocab_size})",
                           param=param, code="invalid_value")
        if len(ids) >= C:
            raise APIError(400, f"This model's maximum context length is {C} tokens, but the prompt has {len(ids)} "
                           f"tokens (at most {C - 1} leave room to generate). Shorten the prompt or set "
                           f"truncate_prompt_tokens.", param=param, code="context_length_exceeded")
        return ids

    def _max_tokens(self, value: int | None, prompt_len: int, param: str) -> int:
        if value is None:
            return self.context - prompt_len
        if value > self.context:
            raise APIError(400, f"{param}: {value} exceeds the model's context of {self.context} tokens",
                           param=param, code="invalid_value")
        return value

    def _submit(self, requests: list) -> Group:
        capacity = self.engine.capacity
        if len(requests) > capacity:
            raise APIError(400, f"{len(requests)} sequences (prompts x n) exceed the {capacity} this server runs at "
                           f"once", param="n", code="invalid_value")
        try:
            return self.engine.submit(requests)
        except QueueFull as err:
            raise APIError(503, f"server overloaded ({err}); retry later", code="overloaded",
                           headers={"Retry-After": str(math.ceil(self.cfg.retry_after_s))})
        except EngineDead as err:
            raise APIError(503, str(err), code="engine_dead")
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value")

    # ------------------------------------------------------------------------------- generation
    async def _collect(self, group: Group, choices: list[Choice], tracker: Tracker) -> None:
        """Wait for every choice to finish (non-streaming); cancels the rest if the client leaves."""
        try:
            while group.open:
                batch = await group.next_batch()
                tracker.observe(batch)
                for i, out in batch:
                    if out.finish_reason == "error":
                        raise APIError(503, f"generation failed: {out.error}", code="engine_error")
                    choices[i].add(out)
        finally:
            self._cancel(group)

    def _cancel(self, group: Group) -> None:
        """Abort what is still running (the client left, or an error): the rows free at the next step."""
        if group.open:
            self.metrics.success.labels("abort").inc(len(group.open))
        group.cancel()

    async def _stream(self, group: Group, choices: list[Choice], tracker: Tracker, chunks_of, usage_chunk):
        """SSE body: every output ready at once goes out in one write; ends with `data: [DONE]`."""
        try:
            while group.open:
                batch = await group.next_batch()
                tracker.observe(batch)
                parts = []
                for i, out in batch:
                    if out.finish_reason == "error":
                        err = error_body(f"generation failed: {out.error}", "server_error", code="engine_error")
                        yield "".join(parts) + _sse(err) + "data: [DONE]\n\n"
                        return
                    choices[i].add(out)
                    parts += [_sse(c) for c in chunks_of(choices[i], out)]
                yield "".join(parts)
            if usage_chunk is not None:
                yield _sse(usage_chunk(usage(choices)))
            yield "data: [DONE]\n\n"
        finally:
            self._cancel(group)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        arrival = time.perf_counter()
        req: CompletionRequest = await self._body(request, CompletionRequest)
        self._check_model(req.model)
        if req.suffix is not None:
            raise APIError(400, "suffix: not supported", param="suffix", code="invalid_value")
        prompts = [self._prompt(self.tok.encode(p) if isinstance(p, str) else list(p), req.truncate_prompt_tokens,
                                "prompt") for p in req.prompts]
        max_tokens = self._max_tokens(16 if req.max_tokens is None else req.max_tokens, 0, "max_tokens")  # OpenAI: 16
        logprobs = req.logprobs is not None
        want_prompt_lp = req.echo and logprobs
        submits, choices = [], []
        for p_i, ids in enumerate(prompts):
            for j in range(req.n):
                submits.append((ids, req.sampling_params(max_tokens, (self.eod,), req.logprobs, want_prompt_lp, j)))
                choices.append(Choice(len(choices), ids, p_i))
        group = self._submit(submits)
        tracker = Tracker(self.metrics, arrival)
        if not req.stream:
            await self._collect(group, choices, tracker)
            return JSONResponse(self.render.completion(choices, req.echo, logprobs).model_dump())
        rid, created = new_id("cmpl")
        include = req.stream_options is not None and req.stream_options.include_usage
        usage_chunk = (lambda u: CompletionResponse(id=rid, created=created, model=self.cfg.model_name, choices=[],
                                                    usage=u)) if include else None
        chunks = lambda c, out: [self.render.completion_chunk(rid, created, c, out, req.echo, logprobs)]  # noqa: E731
        return StreamingResponse(self._stream(group, choices, tracker, chunks, usage_chunk),
                                 media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        arrival = time.perf_counter()
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        self._check_model(req.model)
        try:
            ids, _ = encode_chat(self.tok, req.chat_messages(), add_generation_prompt=True)
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value")
        ids = self._prompt(ids, req.truncate_prompt_tokens, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.token_budget, len(ids), param)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        stops = (self.chat_stop, self.eod)
        group = self._submit([(ids, req.sampling_params(max_tokens, stops, top_n, choice=j)) for j in range(req.n)])
        choices = [Choice(j, ids, 0) for j in range(req.n)]
        tracker = Tracker(self.metrics, arrival)
        if not req.stream:
            await self._collect(group, choices, tracker)
            return JSONResponse(self.render.chat(choices, req.logprobs).model_dump())
        rid, created = new_id("chatcmpl")
        include = req.stream_options is not None and req.stream_options.include_usage
        usage_chunk = (lambda u: ChatCompletionChunk(id=rid, created=created, model=self.cfg.model_name, choices=[],
                                                     usage=u)) if include else None
        chunks = lambda c, out: self.render.chat_chunks(rid, created, c, out, req.logprobs)  # noqa: E731
        return StreamingResponse(self._stream(group, choices, tracker, chunks, usage_chunk),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------------------ other routes
    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        card = ModelCard(id=self.cfg.model_name, max_model_len=self.context)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        req: TokenizeRequest = await self._body(request, TokenizeRequest)
        self._check_model(req.model)
        if req.prompt is not None:
            ids = self.tok.encode(req.prompt)
        else:
            msgs = [{"role": m.role, "content": m.text} for m in req.messages]
            ids, _ = encode_chat(self.tok, msgs, add_generation_prompt=req.add_generation_prompt)
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        req: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        self._check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < self.tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {self.tok.vocab_size})",
                           param="tokens", code="invalid_value")
        return {"prompt": self.tok.decode(req.tokens)}

    @api.get("/health")
    async def health(self):
        try:
            self.engine.check_health()
        except EngineDead as err:
            raise APIError(503, str(err), code="engine_dead")
        return Response(status_code=200)

    @api.get("/metrics")
    async def metrics_route(self, request: Request):
        self._auth(request)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)
