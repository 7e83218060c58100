"""Prometheus metrics of one serving replica (vLLM's names, prefix `mtnlg:`), served at /metrics.

Each replica has its own registry, so /metrics shows the replica that answered; Ray's own
metrics endpoint aggregates the cluster. Latencies are seconds, measured at the replica:

    mtnlg:num_requests_running / _waiting      gauges, read from the engine at scrape time
    mtnlg:prompt_tokens_total, mtnlg:generation_tokens_total
    mtnlg:request_success_total{finished_reason}
    mtnlg:time_to_first_token_seconds          arrival -> first generated token
    mtnlg:inter_token_latency_seconds          between consecutive tokens of one request
    mtnlg:e2e_request_latency_seconds          arrival -> last token
    mtnlg:decode_batch_size                    rows decoded together per engine step (batching)
    mtnlg:prefix_cache_queries_total           prompt tokens looked up in the prefix cache
    mtnlg:prefix_cache_hits_total              of those, tokens found there (hit rate: hits / queries)
    mtnlg:spec_decode_num_draft_tokens_total   tokens proposed by speculative decoding and verified
    mtnlg:spec_decode_num_accepted_tokens_total  of those, tokens accepted (acceptance rate: accepted / draft)
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mtnlg_ray.serve.engine import StepStats
from mtnlg_ray.serve.engine_client import EngineClient

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self, engine: EngineClient):
        r = self.registry = CollectorRegistry()
        Gauge("mtnlg:num_requests_running", "Requests holding a KV-cache row", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("mtnlg:num_requests_waiting", "Requests queued for a row (engine side)", registry=r).set_function(
            lambda: max(0, engine.in_flight - engine.num_running))
        self.prompt_tokens = Counter("mtnlg:prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.generation_tokens = Counter("mtnlg:generation_tokens", "Generated tokens", registry=r)
        self.success = Counter("mtnlg:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("mtnlg:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("mtnlg:inter_token_latency_seconds", "Inter-token latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("mtnlg:e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.batch = Histogram("mtnlg:decode_batch_size", "Rows decoded together per step", registry=r,
                               buckets=BATCH_BUCKETS)
        self.prefix_queries = Counter("mtnlg:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("mtnlg:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.spec_drafts = Counter("mtnlg:spec_decode_num_draft_tokens", "Speculative tokens proposed", registry=r)
        self.spec_accepted = Counter("mtnlg:spec_decode_num_accepted_tokens", "Speculative tokens accepted",
                                     registry=r)

    def on_step(self, stats: StepStats) -> None:
        """Engine hook (after each step): its decode batch, prefix-cache and speculation counts."""
        if stats.decode_batch:
            self.batch.observe(stats.decode_batch)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        self.spec_drafts.inc(stats.spec_draft_tokens)
        self.spec_accepted.inc(stats.spec_accepted_tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class Tracker:
    """Per-request latencies of a Group's members (by index), fed each batch of outputs as it arrives."""

    def __init__(self, metrics: ServeMetrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.last: dict[int, float] = {}  # member -> time of its previous token

    def observe(self, batch) -> None:
        t = time.perf_counter()
        for i, out in batch:
            if out.token_id is not None:
                self.m.generation_tokens.inc()
                if i in self.last:
                    self.m.itl.observe(t - self.last[i])
                else:
                    self.m.ttft.observe(t - self.arrival)
                    self.m.prompt_tokens.inc(out.num_prompt_tokens)
                self.last[i] = t
            if out.finished:
                if out.token_id is None and i not in self.last:
                    self.m.prompt_tokens.inc(out.num_prompt_tokens)
                self.m.success.labels(out.finish_reason).inc()
                self.m.e2e.observe(t - self.arrival)
