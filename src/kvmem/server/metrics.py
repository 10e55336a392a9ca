"""``/metrics``: the server's state in Prometheus' text format (``prometheus-client``).

Gauges are read from the engine after every step (``observe_engine``, on the engine's thread);
counters and histograms grow as requests come and go. Each server has its own registry, so
several in one process (tests) do not mix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvmem.engine.engine import Engine
from kvmem.engine.result import GenerationStats

# seconds; TTFT spans a queued request's wait, inter-token latency one decode step
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
REFUSALS = (
    "unauthorized",
    "invalid",
    "queue_full",
    "draining",
    "kv_budget",
    "prompt_too_long",
    "policy",
)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.kv_bytes = Gauge("kvmem_kv_bytes", "bytes of KV pool blocks, by state", ["state"], registry=r)
        self.kv_budget = Gauge("kvmem_kv_budget_bytes", "the pool's byte budget (0: unlimited)", registry=r)
        self.kv_peak = Gauge("kvmem_kv_bytes_peak", "the most bytes the pool has held", registry=r)
        self.blocks = Gauge("kvmem_kv_blocks", "KV pool blocks, by state", ["state"], registry=r)
        self.requests = Gauge("kvmem_requests", "requests in the engine, by state", ["state"], registry=r)
        self.preemptions = Gauge("kvmem_preemptions", "requests preempted since start", registry=r)
        self.prefix_hits = Counter(
            "kvmem_prefix_hit_tokens", "prompt tokens reused from the prefix cache", ["tier"], registry=r
        )
        self.prompt_tokens = Counter("kvmem_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated = Counter("kvmem_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "kvmem_requests_finished", "requests finished, by reason", ["reason"], registry=r
        )
        self.refused = Counter(
            "kvmem_requests_refused", "requests refused, by reason", ["reason"], registry=r
        )
        self.disk = Gauge("kvmem_disk_tier", "the disk tier's counters since start", ["event"], registry=r)
        self.redis = Gauge("kvmem_redis_tier", "the Redis tier's counters since start", ["event"], registry=r)
        self.tier_up = Gauge(
            "kvmem_tier_up",
            "1 while a tier the server was asked to use takes its writes (disk) or answers (redis), "
            "0 since its last write or call failed",
            ["tier"],
            registry=r,
        )
        self.tier_errors = Gauge(
            "kvmem_tier_errors",
            "a tier's failed writes (disk) or calls (redis) since start",
            ["tier"],
            registry=r,
        )
        self.ttft = Histogram("kvmem_ttft_seconds", "time to first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            "kvmem_inter_token_latency_seconds", "time between tokens", buckets=ITL_BUCKETS, registry=r
        )
        self._peak = 0
        for reason in REFUSALS:
            self.refused.labels(reason)

    def observe_engine(self, engine: Engine) -> None:
        """Read the pool and the queues (call from the engine's thread, between steps)."""
        pool, prefix, scheduler = engine.pool, engine.prefix, engine.scheduler
        cached = [] if prefix is None else prefix.index.unused_blocks()
        cached_bytes = sum(pool.manager.size_of(b) for b in cached)
        self.kv_bytes.labels("used").set(pool.bytes_used)
        self.kv_bytes.labels("running").set(pool.bytes_used - cached_bytes)
        self.kv_bytes.labels("cached").set(cached_bytes)
        self.kv_bytes.labels("free").set(pool.bytes_free or 0)
        self._peak = max(self._peak, pool.bytes_used)
        self.kv_peak.set(self._peak)
        self.kv_budget.set(pool.budget or 0)
        self.blocks.labels("running").set(pool.num_blocks - len(cached))
        self.blocks.labels("cached").set(len(cached))
        self.requests.labels("running").set(len(scheduler.running))
        self.requests.labels("waiting").set(len(scheduler.waiting))
        self.requests.labels("preempted").set(len(scheduler.swapped))
        self.preemptions.set(scheduler.stats.preemptions)
        disk = None if prefix is None else prefix.disk
        if disk is not None:
            for event in ("hits", "misses", "corrupt", "writes", "write_errors", "evicted"):
                self.disk.labels(event).set(getattr(disk.stats, event))
            self.tier_up.labels("disk").set(0 if disk.failing else 1)
            self.tier_errors.labels("disk").set(disk.stats.write_errors)
        shared = None if prefix is None else prefix.redis
        if shared is not None:
            for event in ("hits", "misses", "corrupt", "writes", "errors", "skipped"):
                self.redis.labels(event).set(getattr(shared.stats, event))
            self.tier_up.labels("redis").set(0 if shared.failing else 1)
            self.tier_errors.labels("redis").set(shared.stats.errors)

    def observe_finished(self, stats: GenerationStats, reason: str) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        remote = stats.tokens_from_disk + stats.tokens_from_redis
        self.prefix_hits.labels("ram").inc(stats.tokens_reused - remote)
        self.prefix_hits.labels("disk").inc(stats.tokens_from_disk)
        self.prefix_hits.labels("redis").inc(stats.tokens_from_redis)
        self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
