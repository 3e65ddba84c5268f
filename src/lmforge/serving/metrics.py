"""``GET /metrics``: the server's counters and histograms in Prometheus's text format (prometheus-client).

==================================================  ========================================================
metric                                              what
==================================================  ========================================================
lmforge_requests_total{path, status}                HTTP requests answered (paths outside the API: "other")
lmforge_prompt_tokens_total                         prompt tokens of the requests the engine served
lmforge_completion_tokens_total                     tokens sampled
lmforge_time_to_first_token_seconds                 histogram: request received -> first token sampled
lmforge_time_per_output_token_seconds               histogram: per request, the mean gap between its tokens
lmforge_queue_depth                                 requests waiting for a slot now
lmforge_active_samples                              KV cache slots in use now
lmforge_engine_restarts_total                       engine threads started again after one died
lmforge_failed_jobs_total                           jobs (one prompt of a request) the engine ended with an error
lmforge_forward_passes_total                        batched decode steps
==================================================  ========================================================

Each app has its own registry (several servers in one process count apart).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PATHS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
         "/tokenizer_info"}
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    """The metrics of one server; ``engine()`` returns its engine (None before start-up)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of served requests", registry=r)
        self.completion_tokens = Counter("lmforge_completion_tokens", "tokens sampled", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "request received to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("lmforge_time_per_output_token_seconds", "mean gap between a request's tokens",
                              buckets=_TPOT_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in PATHS or path.startswith("/v1/models/") else "other", str(status)).inc()

    def tokens(self, prompt: int, completion: int, ttft: float | None, tpot: float | None) -> None:
        """One request's tokens and latencies (None: not measured, e.g. nothing was sampled)."""
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's own counts, read when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine()
        if engine is None:
            return
        yield GaugeMetricFamily("lmforge_queue_depth", "requests waiting for a slot", value=engine.queued())
        yield GaugeMetricFamily("lmforge_active_samples", "KV cache slots in use", value=engine.busy_slots())
        yield CounterMetricFamily("lmforge_engine_restarts", "engine threads restarted", value=engine.restarts)
        yield CounterMetricFamily("lmforge_failed_jobs", "jobs ended by an engine error", value=engine.failed_jobs)
        yield CounterMetricFamily("lmforge_forward_passes", "batched decode steps", value=engine.steps)
