"""The replica's LoRA adapter list, without Ray: LRU order, a load at the bound unloads the least recently
used adapter with no request in flight (503 when every one has some), an unload waits for the adapter's
requests, and a caller cancelled half-way leaves this side and the engine in agreement."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from mtnlg_ray.serve.ingress import APIError
from mtnlg_ray.serve.lora_adapters import LoraAdapters


class FakeEngine:
    """The engine client's LoRA side: in-flight counts, and load / unload calls recorded in order."""

    def __init__(self):
        self.lora_in_flight: Counter[str] = Counter()
        self.calls: list[tuple[str, str]] = []
        self.slow = asyncio.Event()
        self.slow.set()

    async def load_lora(self, name, path):
        await self.slow.wait()
        self.calls.append(("load", name))

    async def unload_lora(self, name):
        self.calls.append(("unload", name))


@pytest.fixture
def runs(tiny_loras, tiny):
    return {name: str(run) for name, (run, _) in tiny_loras.items()}, tiny[0].config


def test_lru_eviction_skips_adapters_with_requests_and_unload_waits_for_them(runs):
    paths, base = runs

    async def scenario():
        engine = FakeEngine()
        loras = LoraAdapters(engine, "base", base, 2, {"sql": paths["sql"]})
        assert loras.resolve("base") is None and loras.resolve(None) is None
        await loras.load("chat", paths["chat"])
        assert loras.resolve("sql") == "sql"  # sql is now the most recently used: chat goes first ...
        engine.lora_in_flight["chat"] = 1  # ... unless chat has a request in flight
        await loras.load("poem", paths["poem"])
        assert list(loras.paths) == ["chat", "poem"] and engine.calls[-2:] == [("unload", "sql"), ("load", "poem")]
        engine.lora_in_flight["poem"] = 2
        with pytest.raises(APIError) as err:
            await loras.load("sql", paths["sql"])
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
        with pytest.raises(APIError) as err:
            loras.resolve("sql")
        assert (err.value.status, err.value.code) == (404, "model_not_found")

        unloading = asyncio.ensure_future(loras.unload("chat"))
        await asyncio.sleep(0.2)
        assert not unloading.done() and "chat" not in loras.paths  # no new request resolves to it
        del engine.lora_in_flight["chat"]  # its last request finished
        await unloading
        assert engine.calls[-1] == ("unload", "chat")
        with pytest.raises(APIError) as err:
            await loras.unload("chat")
        assert (err.value.status, err.value.message) == (404, "The lora adapter 'chat' cannot be found.")

        engine.slow.clear()  # a caller cancelled during the engine's load: the load still completes here
        loading = asyncio.ensure_future(loras.load("sql", paths["sql"]))
        await asyncio.sleep(0.2)
        loading.cancel()
        engine.slow.set()
        await asyncio.sleep(0.1)
        assert list(loras.paths) == ["poem", "sql"] and engine.calls[-1] == ("load", "sql")

    asyncio.run(asyncio.wait_for(scenario(), 30))  # a wrong eviction waits forever on a busy adapter
