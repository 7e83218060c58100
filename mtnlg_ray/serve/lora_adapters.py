"""The LoRA adapters a replica serves beside its base model, and their runtime loading (vLLM's
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

The engine process holds the weights (a `LoraBank` of `max_loras` slots, model/multi_lora.py); this side
keeps the names clients may send as `model`, least recently used first, and decides what is unloaded:

    resolve(model)        None for the base model, the adapter's name, or a 404 (refreshes its LRU place)
    load(name, path)      checks the path (checkpoint/lora_adapter.py: a LoRA run of the served model's
                          shape) before anything changes; at the bound, unloads the least recently used
                          adapter that has no request in flight (503 if every one has); then the engine loads it
                          (a load that fails there leaves that adapter unloaded)
    unload(name)          the name stops resolving at once; the slot is freed once its requests finish

A request's adapter cannot be unloaded under it: `resolve` and the engine client's `submit` run with no
await between them, and an adapter is unloaded only when the engine client counts no request of it in
flight. The engine process answers load and unload in the order they were sent, after every request
sent before them. Load and unload run one at a time.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from mtnlg_ray.checkpoint.lora_adapter import check_adapter
from mtnlg_ray.config import ModelConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.serve.ingress import APIError

DRAIN_POLL_S = 0.05  # how often an unload checks whether the adapter's last requests have finished


class LoraAdapters:
    """`engine`: the replica's ProcessEngine (its adapters loaded at start: `loaded`, name -> path)."""

    def __init__(self, engine, base_name: str, base: ModelConfig, max_loras: int, loaded: dict[str, str],
                 retry_after_s: float = 1.0):
        self.engine, self.base_name, self.base, self.max_loras = engine, base_name, base, max_loras
        self.paths: OrderedDict[str, str] = OrderedDict(loaded)  # least recently used first
        self.retry_after_s = retry_after_s
        self._lock = asyncio.Lock()

    def resolve(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 for a name not served."""
        if model is None or model == self.base_name:
            return None
        if model not in self.paths:
            served = ", ".join(f"`{n}`" for n in [self.base_name, *self.paths])
            raise APIError(404, f"The model `{model}` does not exist (this server has {served})", param="model",
                           code="model_not_found")
        self.paths.move_to_end(model)
        return model

    async def load(self, name: str, path: str) -> None:
        if name == self.base_name:
            raise APIError(400, f"lora_name: `{name}` is the base model's name", param="lora_name",
                           code="invalid_value")
        if name in self.paths:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                           code="invalid_value")
        try:  # the path's files only (no tensors), off the event loop: a remote run is fetched first
            await asyncio.to_thread(check_adapter, path, self.base)
        except UserError as err:
            raise APIError(400, f"lora_path: {err}", param="lora_path", code="invalid_value") from None
        await asyncio.shield(self._load(name, path))  # a client that leaves cannot cut it half-way

    async def unload(self, name: str) -> None:
        if name not in self.paths:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        await asyncio.shield(self._unload_if_served(name))

    async def _unload_if_served(self, name: str) -> None:
        async with self._lock:
            if name in self.paths:  # not unloaded meanwhile
                await self._unload(name)

    async def _load(self, name: str, path: str) -> None:
        async with self._lock:
            if name in self.paths:  # loaded meanwhile
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                               code="invalid_value")
            if len(self.paths) >= self.max_loras:
                await self._unload(self._idle_victim())
            error = await self.engine.load_lora(name, path)
            if error is not None:
                raise APIError(400, f"lora_path: {error}", param="lora_path", code="invalid_value")
            self.paths[name] = path

    def _idle_victim(self) -> str:
        """The least recently used adapter with no request in flight; 503 when every one has some."""
        for name in self.paths:
            if not self.engine.lora_in_flight.get(name):
                return name
        raise APIError(503, f"all {self.max_loras} LoRA adapters (max_loras) are serving requests; retry later",
                       code="overloaded", headers={"Retry-After": str(max(1, round(self.retry_after_s)))})

    async def _unload(self, name: str) -> None:
        del self.paths[name]  # no new request resolves to it from here on
        while self.engine.lora_in_flight.get(name):
            await asyncio.sleep(DRAIN_POLL_S)
        error = await self.engine.unload_lora(name)
        if error is not None:  # the engine disagrees with this side: a bug, not a user mistake
            raise RuntimeError(f"unloading LoRA adapter {name!r}: {error}")
