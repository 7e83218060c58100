"""The engine client, over an engine stepped by a thread (serve/thread_engine.py), without Ray: requests are
validated at submit, streams, cancellation frees the rows, the in-flight bound, and a step loop that
dies fails its requests and the health check and calls on_dead once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mtnlg_ray.serve.engine import Engine, QueueFull
from mtnlg_ray.serve.engine_client import EngineDead, InvalidRequest
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.thread_engine import ThreadEngine

GREEDY = dict(temperature=0.0)


def test_requests_are_validated_at_submit(tiny):
    model, tok = tiny
    client = ThreadEngine(Engine(model, max_context=16))  # validation needs no stepper: none starts
    ok = SamplingParams()
    cases = [([], ok, "prompt", "the prompt has no tokens"),
             ([1, tok.vocab_size], ok, "prompt", f"token id {tok.vocab_size} is outside the vocabulary"),
             ([1], SamplingParams(stop_token_ids=(-1,)), "stop_token_ids", "token id -1 is outside"),
             ([1], SamplingParams(logit_bias={99999: 1.0}), "logit_bias", "token id 99999 is outside"),
             (list(range(3, 19)), ok, "prompt", "maximum context length is 16 tokens, but the prompt has 16 tokens")]
    for prompt, params, field, message in cases:
        with pytest.raises(InvalidRequest, match=message) as err:
            client.submit([([1], ok), (prompt, params)])  # all or none
        assert err.value.field == field and err.value.too_long == (len(prompt) == 16)
    assert client.in_flight == 0 and client._thread is None


def test_streams_cancels_and_bounds(tiny):
    model, tok = tiny

    async def main():
        aeng = ThreadEngine(Engine(model, max_slots=2, max_waiting=1, decode=tok.decode))
        group = aeng.submit([(tok.encode("def"), SamplingParams(max_tokens=5, **GREEDY)),
                             (tok.encode("class"), SamplingParams(max_tokens=8, **GREEDY))])
        seen = {0: [], 1: []}
        async for i, out in group:
            seen[i].append(out)
        assert [len(seen[0]), len(seen[1])] == [5, 8] and seen[1][-1].finish_reason == "length"
        assert aeng.in_flight == 0

        long = aeng.submit([(tok.encode("x"), SamplingParams(max_tokens=200))] * 3)  # 2 rows + 1 waiting
        with pytest.raises(QueueFull):
            aeng.submit([(tok.encode("y"), SamplingParams(max_tokens=1))])
        async for _ in long:
            break  # the first token arrived; the client goes away
        long.cancel()
        assert aeng.in_flight == 0
        for _ in range(200):  # the step thread frees the rows at its next step
            if aeng.engine.num_running == 0 and aeng.engine.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        assert aeng.engine.num_running == 0 and sorted(aeng.engine.free) == [0, 1]
        aeng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


class BrokenModel(torch.nn.Module):
    """A GPT that fails on its third forward (as a GPU fault would)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("device lost")
        return self.inner(*args, **kwargs)


def test_dead_step_loop_fails_requests_and_health(tiny):
    model, tok = tiny

    async def main():
        aeng = ThreadEngine(Engine(BrokenModel(model), max_slots=2))
        died = []
        aeng.on_dead = died.append
        aeng.check_health()
        group = aeng.submit([(tok.encode("a"), SamplingParams(max_tokens=50))])
        outs = [o async for _, o in group]
        assert outs[-1].finish_reason == "error" and "device lost" in outs[-1].error
        with pytest.raises(EngineDead, match="device lost"):
            aeng.check_health()
        with pytest.raises(EngineDead):
            aeng.submit([(tok.encode("b"), SamplingParams(max_tokens=1))])
        assert died == [outs[-1].error]

    asyncio.run(asyncio.wait_for(main(), 60))
