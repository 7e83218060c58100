"""The engine in a child process, without Ray: same tokens as the model alone, cancellation frees rows,
a dead child fails its requests and the health check (naming no process id) and calls on_dead, a dead
parent takes the child with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from mtnlg_ray.config import SpeculativeConfig
from mtnlg_ray.model.generate import generate
from mtnlg_ray.serve.engine_client import EngineDead
from mtnlg_ray.serve.engine_process import ProcessEngine
from mtnlg_ray.serve.sampling import SamplingParams


def gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_outputs_cancellation_and_load(tiny_checkpoint, tiny):
    model, tok = tiny
    texts = ["def f(x):\n    return", "import os", "class Wrapper:"]
    lengths = [20, 9, 14]

    async def main():
        # with speculative decoding: greedy tokens are the same, and the step stats come back
        eng = ProcessEngine(str(tiny_checkpoint), max_slots=2, max_waiting=2,
                            speculative=SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=2))
        assert (eng.capacity, eng.vocab_size, eng.max_context) == (4, tok.vocab_size, model.config.max_seq_len)
        steps = []
        eng.on_step = steps.append
        group = eng.submit([(tok.encode(t), SamplingParams(max_tokens=n, temperature=0.0))
                            for t, n in zip(texts, lengths)])  # 2 rows: the third waits for one
        got = {0: [], 1: [], 2: []}
        async for i, out in group:
            got[i].append(out.token_id)
        for i, text in enumerate(texts):
            ids = tok.encode(text)
            assert got[i] == generate(model, [ids], lengths[i])[0][len(ids):], f"request {i}"
        assert max(s.decode_batch for s in steps) == 2 and eng.in_flight == 0 and eng.num_running == 0
        assert sum(s.spec_draft_tokens for s in steps) > 0 and sum(s.prefix_cache_queries for s in steps) > 0

        long = eng.submit([(tok.encode("x"), SamplingParams(max_tokens=200))] * 2)
        async for _ in long:
            break  # the first token arrived; the client goes away
        long.cancel()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if eng.free_rows == 2:
                break
        assert (eng.free_rows, eng.num_running, eng.in_flight) == (2, 0, 0)
        eng.check_health()
        eng.shutdown()
        assert gone(eng.pid, 10)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_killed_child_fails_open_requests_and_health(tiny_checkpoint, tiny):
    _, tok = tiny

    async def main():
        eng = ProcessEngine(str(tiny_checkpoint), max_slots=2)
        died = []
        eng.on_dead = died.append
        group = eng.submit([(tok.encode("a"), SamplingParams(max_tokens=200, temperature=0.0))] * 3)
        await group.__anext__()
        os.kill(eng.pid, signal.SIGKILL)
        outs = [out async for _, out in group]  # ends: no hang
        error = "the engine process stopped (killed by SIGKILL)"
        assert outs[-1].finish_reason == "error" and outs[-1].error == error and str(eng.pid) not in error
        assert eng.in_flight == 0 and died == [error]
        with pytest.raises(EngineDead, match="killed by SIGKILL"):
            eng.check_health()
        with pytest.raises(EngineDead):
            eng.submit([(tok.encode("b"), SamplingParams(max_tokens=1))])

    asyncio.run(asyncio.wait_for(main(), 120))


PARENT = """
import sys
from mtnlg_ray.serve.engine_process import ProcessEngine
eng = ProcessEngine(sys.argv[1])
print(eng.pid, flush=True)
sys.stdin.read()
"""


def test_the_child_exits_when_its_parent_is_killed(tiny_checkpoint):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_checkpoint)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert gone(child, 10), "engine process outlived its parent"


def test_a_bad_checkpoint_is_one_clear_error(tmp_path):
    from mtnlg_ray.errors import UserError

    with pytest.raises(UserError, match="nowhere"):
        ProcessEngine(str(tmp_path / "nowhere"))
