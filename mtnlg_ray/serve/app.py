"""The OpenAI-compatible HTTP server: a FastAPI ingress on a Ray Serve deployment.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE with `stream: true`, ending in
`data: [DONE]`), GET /v1/models, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (LoRA adapters
served unmerged, chosen per request by `model`: lora_adapters.py), GET /health, GET /metrics, GET /version,
and from the mixin in
tokenization.py POST /tokenize, POST /detokenize, GET /tokenizer_info; ingress.py holds the FastAPI
object, errors, body reading and the OpenAPI document (/openapi.json, Swagger UI at /docs).
Every error is an OpenAI error body `{"error": {"message", "type", "param", "code"}}` with
400 (bad field), 401 (API key), 404 (model, route), 413 (body size) or 503 (overloaded: engine
queue or Serve's max_queued_requests, both with Retry-After; a dead engine); a request never
produces a 500. With an API key (serve.api_key, `--api-key`, or MTNLG_API_KEY in the replica), every
route but /health, /version and the docs needs `Authorization: Bearer <key>`. A client that
disconnects cancels its generation (its rows free).

A replica is two processes: this one (FastAPI routes, tokenizer, validation, rendering, metrics)
and its engine process (engine_process.py: the model, the KV cache, continuous batching), so the
per-chunk Python here never holds up a decode step. If the engine process dies, its requests end
with a 503 `engine_dead` (an error event in a stream; /health answers the same) and this replica
ends itself at once, so Serve's routers drop it and its controller replaces it; if this process
dies, Serve's proxy ends its open streams with an error event (proxy.py) and the engine process
exits. Prompts are validated by the engine client (engine_client.py), its errors mapped to 400s here.

Deployed by deploy.py: `build_app(ServeJob)` (Serve config YAML: `import_path: mtnlg_ray.serve.deploy:build_app`)
or `mtnlg serve CHECKPOINT` (`run_serve`).
"""

import asyncio
import copy
import json
import logging
import math
import os
import time
import weakref
from pathlib import Path

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve

from mtnlg_ray import __version__
from mtnlg_ray.config import ServeConfig
from mtnlg_ray.data.chat import chat_stop_id, load_chat_template
from mtnlg_ray.data.tokenizer import load_tokenizer
from mtnlg_ray.serve.engine import QueueFull
from mtnlg_ray.serve.engine_client import EngineDead, Group, InvalidRequest
from mtnlg_ray.serve.engine_process import ProcessEngine
from mtnlg_ray.serve.ingress import APIError, api, body_doc, check_api_key, document_key, read_body
from mtnlg_ray.serve.lora_adapters import LoraAdapters
from mtnlg_ray.serve.metrics import ServeMetrics, Tracker
from mtnlg_ray.serve.proxy import RETRY_AFTER_S
from mtnlg_ray.serve.render import Choice, Renderer, new_id, usage
from mtnlg_ray.serve.responses import (ChatCompletionChunk, ChatCompletionResponse, CompletionResponse, ModelCard,
                                       ModelList, VersionResponse, error_body)
from mtnlg_ray.serve.schemas import (ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest,
                                     UnloadLoraAdapterRequest)
from mtnlg_ray.serve.tokenization import Tokenization

log = logging.getLogger(__name__)
EXIT_GRACE_S = 2.0  # after its engine died, a replica exits once its open responses are written, at most this late


def _usage_chunk(req, cls: type[BaseModel], rid: str, created: int, model: str):
    """stream_options.include_usage: usage -> the stream's last chunk (no choices, the usage); else None."""
    if req.stream_options is None or not req.stream_options.include_usage:
        return None
    return lambda u: cls(id=rid, created=created, model=model, choices=[], usage=u)


def _sse(obj: BaseModel | dict) -> str:
    body = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {body}\n\n"


@serve.deployment(name="OpenAIServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress(api)
class OpenAIServer(Tokenization):
    """One replica: the model, its continuous-batching engine, and the OpenAI routes."""

    def __init__(self, serve_config: dict):
        cfg = self.cfg = ServeConfig.model_validate(serve_config)
        device = cfg.device if cfg.device != "auto" else ("auto" if cfg.num_gpus else "cpu")
        # The model and its engine live in a child process (engine_process.py); this one does HTTP.
        self.engine = ProcessEngine(cfg.checkpoint, device, cfg.max_batch_slots, cfg.max_context, cfg.max_waiting,
                                    cfg.engine_prefix_blocks, cfg.speculative, cfg.lora_adapters, cfg.max_loras,
                                    quantization=cfg.quantization)
        self.loras = LoraAdapters(self.engine, cfg.model_name, self.engine.model_config, cfg.max_loras,
                                  cfg.lora_adapters, cfg.retry_after_s)
        self.tok = load_tokenizer(self.engine.tokenizer_path)
        self.context = self.engine.max_context
        self.metrics = ServeMetrics(self.engine)
        self.engine.on_step = self.metrics.on_step
        self.engine.on_dead = self._engine_died
        self._groups: weakref.WeakSet[Group] = weakref.WeakSet()  # requests being answered
        self.render = Renderer(self.tok, cfg.model_name)
        self.eod, self.chat_stop = self.tok.eod_id, chat_stop_id(self.tok)
        checkpoint_dir = Path(self.engine.tokenizer_path).parent  # a tokenizer.model sits beside its template
        self.chat_template = load_chat_template(cfg.chat_template, checkpoint_dir)
        self.api_key = cfg.api_key or os.environ.get("MTNLG_API_KEY") or None
        document_key(self.api_key is not None)
        if cfg.max_context is not None and cfg.max_context > self.context:
            log.warning("max_context=%d exceeds the model's %d tokens: serving %d", cfg.max_context, self.context,
                        self.context)
        log.info("serving %s (%s) on %s: %d rows x %d tokens, engine process %d", cfg.model_name, cfg.checkpoint,
                 self.engine.device, cfg.max_batch_slots, self.context, self.engine.pid)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; it raises once the engine has died (by then the
        replica is exiting: `_engine_died`)."""
        self.engine.check_health()

    def _engine_died(self, error: str) -> None:
        """The engine process stopped: this replica serves nothing more, so it ends itself. Serve's routers
        then stop sending it requests, and its controller replaces it at the next health check (a failing
        check_health alone takes three periods, while the broken replica answers every request with a
        503 at once and so attracts more). Open requests first get their error event out."""
        log.error("%s; this replica exits so that Serve replaces it", error)
        asyncio.get_running_loop().create_task(self._exit_when_answered())

    async def _exit_when_answered(self) -> None:
        deadline = time.monotonic() + EXIT_GRACE_S
        while any(not g.queue.empty() for g in self._groups) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # each response's last outputs (the error) not yet taken
        await asyncio.sleep(0.2)  # the last chunks on their way to the proxy
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception:  # noqa: BLE001 - not an actor (or Ray is gone): end the process all the same
            os._exit(1)

    def replica_info(self) -> dict:
        """Process ids and engine load of this replica (for operators and tests, via a handle)."""
        e = self.engine
        return {"pid": os.getpid(), "engine_pid": e.pid, "running": e.num_running, "waiting": e.num_waiting,
                "in_flight": e.in_flight, "free_rows": e.free_rows}

    def __del__(self):
        self.engine.shutdown()

    # ------------------------------------------------------------------------------ request edge
    def _auth(self, request: Request) -> None:
        check_api_key(request, self.api_key)

    async def _body(self, request: Request, model_cls: type[BaseModel]):
        """Authenticate, then read and validate the body (ingress.read_body): each failure a clear 4xx."""
        self._auth(request)
        return await read_body(request, model_cls, self.cfg.max_body_bytes)

    async def _open(self, request: Request, model_cls: type[BaseModel]):
        """A generation request's start: (arrival time, its validated body, its LoRA adapter, its renderer)."""
        arrival = time.perf_counter()
        req = await self._body(request, model_cls)
        return (arrival, req, *self._model_of(req.model))

    def _model_of(self, name: str | None) -> tuple[str | None, Renderer]:
        """(the LoRA adapter the request's `model` names, None: the base model; 404 if it is neither, and
        the response renderer: an adapter's responses name the adapter as their `model`, as vLLM's)."""
        lora = self.loras.resolve(name)
        if lora is None:
            return None, self.render
        render = copy.copy(self.render)  # shares the token-string cache
        render.model = lora
        return lora, render

    def _max_tokens(self, value: int | None, prompt_len: int, param: str) -> int:
        if value is None:  # all the room left (a prompt that leaves none is refused at submit)
            return max(self.context - prompt_len, 1)
        if value > self.context:
            raise APIError(400, f"{param}: {value} exceeds the model's context of {self.context} tokens",
                           param=param, code="invalid_value")
        return value

    def _submit(self, requests: list, prompt_param: str, lora: str | None = None) -> Group:
        """Hand the requests to the engine client, which validates them (the one place); its errors as HTTP."""
        capacity = self.engine.capacity
        if len(requests) > capacity:
            raise APIError(400, f"{len(requests)} sequences (prompts x n) exceed the {capacity} this server runs at "
                           f"once", param="n", code="invalid_value")
        try:
            group = self.engine.submit(requests, lora)
        except InvalidRequest as err:
            param = prompt_param if err.field == "prompt" else err.field
            if err.too_long:
                raise APIError(400, f"{err}. Shorten the prompt or set truncate_prompt_tokens.", param=param,
                               code="context_length_exceeded")
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_value")
        except QueueFull as err:
            raise APIError(503, f"server overloaded ({err}); retry later", code="overloaded",
                           headers={"Retry-After": str(math.ceil(self.cfg.retry_after_s))})
        except EngineDead as err:
            raise self._dead(str(err))
        self._groups.add(group)
        return group

    @staticmethod
    def _dead(error: str) -> APIError:
        """The answer of every request once the engine died, /health's too (one code, no process ids)."""
        return APIError(503, f"{error}; this replica is being replaced, retry", code="engine_dead",
                        headers={"Retry-After": str(RETRY_AFTER_S)})

    # ------------------------------------------------------------------------------- generation
    async def _collect(self, group: Group, choices: list[Choice], tracker: Tracker) -> None:
        """Wait for every choice to finish (non-streaming); cancels the rest if the client leaves."""
        try:
            while group.open:
                batch = await group.next_batch()
                tracker.observe(batch)
                for i, out in batch:
                    if out.finish_reason == "error":  # the engine died
                        raise self._dead(out.error)
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
                    if out.finish_reason == "error":  # the engine died
                        dead = self._dead(out.error)
                        err = error_body(dead.message, "server_error", code=dead.code)
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

    @api.post("/v1/completions", response_model=CompletionResponse, tags=["generation"],
              openapi_extra=body_doc(CompletionRequest))
    async def completions(self, request: Request):
        arrival, req, lora, render = await self._open(request, CompletionRequest)
        prompts = [self.truncate(self.encode_text(p, req.split_special_tokens) if isinstance(p, str) else list(p),
                                 req.truncate_prompt_tokens) for p in req.prompts]
        max_tokens = self._max_tokens(16 if req.max_tokens is None else req.max_tokens, 0, "max_tokens")  # OpenAI: 16
        logprobs = req.logprobs is not None
        want_prompt_lp = req.echo and logprobs
        submits, choices = [], []
        for p_i, ids in enumerate(prompts):
            for j in range(req.n):
                submits.append((ids, req.sampling_params(max_tokens, (self.eod,), req.logprobs, want_prompt_lp, j)))
                choices.append(Choice(len(choices), ids, p_i))
        group = self._submit(submits, "prompt", lora)
        tracker = Tracker(self.metrics, arrival)
        if not req.stream:
            await self._collect(group, choices, tracker)
            return JSONResponse(render.completion(choices, req.echo, logprobs).model_dump())
        rid, created = new_id("cmpl")
        usage_chunk = _usage_chunk(req, CompletionResponse, rid, created, render.model)
        chunks = lambda c, out: [render.completion_chunk(rid, created, c, out, req.echo, logprobs)]  # noqa: E731
        return StreamingResponse(self._stream(group, choices, tracker, chunks, usage_chunk),
                                 media_type="text/event-stream")

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["generation"],
              openapi_extra=body_doc(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        arrival, req, lora, render = await self._open(request, ChatCompletionRequest)
        ids = self.encode_messages(req.chat_messages(), True, req.split_special_tokens)
        ids = self.truncate(ids, req.truncate_prompt_tokens)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(req.token_budget, len(ids), param)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        stops = (self.chat_stop, self.eod)
        group = self._submit([(ids, req.sampling_params(max_tokens, stops, top_n, choice=j)) for j in range(req.n)],
                             "messages", lora)
        choices = [Choice(j, ids, 0) for j in range(req.n)]
        tracker = Tracker(self.metrics, arrival)
        if not req.stream:
            await self._collect(group, choices, tracker)
            return JSONResponse(render.chat(choices, req.logprobs).model_dump())
        rid, created = new_id("chatcmpl")
        usage_chunk = _usage_chunk(req, ChatCompletionChunk, rid, created, render.model)
        chunks = lambda c, out: render.chat_chunks(rid, created, c, out, req.logprobs)  # noqa: E731
        return StreamingResponse(self._stream(group, choices, tracker, chunks, usage_chunk),
                                 media_type="text/event-stream")

    # ------------------------------------------------------------------------------ other routes
    @api.get("/v1/models", response_model=ModelList, tags=["models"])
    async def models(self, request: Request):
        self._auth(request)
        cards = [ModelCard(id=self.cfg.model_name, max_model_len=self.context)]
        cards += [ModelCard(id=name, root=path, parent=self.cfg.model_name, max_model_len=self.context)
                  for name, path in self.loras.paths.items()]
        return JSONResponse(ModelList(data=cards).model_dump())

    @api.post("/v1/load_lora_adapter", tags=["models"], openapi_extra=body_doc(LoadLoraAdapterRequest))
    async def load_lora_adapter(self, request: Request):
        req: LoadLoraAdapterRequest = await self._body(request, LoadLoraAdapterRequest)
        try:
            await self.loras.load(req.lora_name, req.lora_path)
        except EngineDead as err:
            raise self._dead(str(err))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @api.post("/v1/unload_lora_adapter", tags=["models"], openapi_extra=body_doc(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(self, request: Request):
        req: UnloadLoraAdapterRequest = await self._body(request, UnloadLoraAdapterRequest)
        try:
            await self.loras.unload(req.lora_name)
        except EngineDead as err:
            raise self._dead(str(err))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @api.get("/health", tags=["operations"])
    async def health(self):
        try:
            self.engine.check_health()
        except EngineDead as err:
            raise self._dead(str(err))
        return Response(status_code=200)

    @api.get("/metrics", tags=["operations"])
    async def metrics_route(self, request: Request):
        self._auth(request)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    @api.get("/version", response_model=VersionResponse, tags=["operations"])
    async def version(self):
        return {"version": __version__}
