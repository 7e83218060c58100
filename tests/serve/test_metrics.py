"""Prometheus metrics of a replica: the tracker's latencies and token counts, the engine's batch hook."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from mtnlg_ray.serve.engine import Engine, StepStats
from mtnlg_ray.serve.metrics import ServeMetrics, Tracker
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.thread_engine import ThreadEngine


def samples(metrics: ServeMetrics) -> dict:
    text = metrics.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_tracker_and_batch_histogram(tiny):
    model, tok = tiny

    async def main():
        aeng = ThreadEngine(Engine(model, max_slots=4))
        m = ServeMetrics(aeng)
        aeng.on_step = m.on_step
        prompts = [tok.encode(t) for t in ("a = 1", "def f():", "import re")]
        group = aeng.submit([(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in prompts])
        tracker = Tracker(m, arrival=0.0)
        while group.open:
            tracker.observe(await group.next_batch())
        aeng.shutdown()
        return m, sum(map(len, prompts))

    m, prompt_tokens = asyncio.run(asyncio.wait_for(main(), 60))
    s = samples(m)
    assert s[("mtnlg:generation_tokens_total", ())] == 18 and s[("mtnlg:prompt_tokens_total", ())] == prompt_tokens
    assert s[("mtnlg:time_to_first_token_seconds_count", ())] == 3
    assert s[("mtnlg:inter_token_latency_seconds_count", ())] == 15
    assert s[("mtnlg:e2e_request_latency_seconds_count", ())] == 3
    assert s[("mtnlg:request_success_total", (("finished_reason", "length"),))] == 3
    assert s[("mtnlg:decode_batch_size_sum", ())] == 15  # 5 decode steps of the 3 rows together
    assert s[("mtnlg:num_requests_running", ())] == 0
    assert s[("mtnlg:prefix_cache_queries_total", ())] == prompt_tokens  # looked up; too short to hit
    assert s[("mtnlg:prefix_cache_hits_total", ())] == 0


def test_prefix_cache_and_speculation_counters(tiny):
    m = ServeMetrics(ThreadEngine(Engine(tiny[0], max_slots=1)))
    m.on_step(StepStats(prefills=1, prefix_cache_queries=40, prefix_cache_hits=32))
    m.on_step(StepStats(decode_batch=2, spec_draft_tokens=8, spec_accepted_tokens=5))
    s = samples(m)
    assert (s[("mtnlg:prefix_cache_queries_total", ())], s[("mtnlg:prefix_cache_hits_total", ())]) == (40, 32)
    assert s[("mtnlg:spec_decode_num_draft_tokens_total", ())] == 8
    assert s[("mtnlg:spec_decode_num_accepted_tokens_total", ())] == 5
