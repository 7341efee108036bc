"""Prometheus metrics of a serving process (GET /metrics), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster.failover import FailoverState
from runtime.engine import Engine
from runtime.prompt_cache import PromptCache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROUND_TRIP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kimi_requests", "API requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("kimi_prompt_tokens", "Prompt tokens processed", registry=r)
        self.reused_prompt_tokens = Counter("kimi_prompt_tokens_reused",
                                            "Prompt tokens taken from an earlier request's KV cache, not computed",
                                            registry=r)
        self.generated_tokens = Counter("kimi_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("kimi_time_to_first_token_seconds",
                                             "From request arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("kimi_inter_token_latency_seconds",
                                             "Between consecutive tokens of one sequence",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.worker_round_trip = Histogram("kimi_worker_round_trip_seconds",
                                           "Per layer and step: request to a worker until its partial sums arrive",
                                           ["node"], buckets=ROUND_TRIP_BUCKETS, registry=r)
        self.expert_activations = Counter("kimi_expert_activations",
                                          "(token, routed expert) pairs computed, by the node that holds the expert",
                                          ["node"], registry=r)
        self.running = Gauge("kimi_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("kimi_waiting_sequences", "Requests waiting for a batch slot", registry=r)
        self.step_rows = Histogram("kimi_step_rows", "Token rows per forward step (batch size plus prompt chunks)",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)

    def observe_experts(self, node: str, pairs: int, round_trip_s: float | None) -> None:
        """A RemoteExperts observer."""
        self.expert_activations.labels(node).inc(pairs)
        if round_trip_s is not None:
            self.worker_round_trip.labels(node).observe(round_trip_s)

    def watch_prompt_cache(self, cache: PromptCache) -> None:
        """The prompt cache's kept caches, tokens, bytes and evictions, read at each scrape."""
        self.registry.register(_PromptCacheCollector(cache))

    def watch_speculation(self, engine: Engine) -> None:
        """Drafted and accepted tokens and the acceptance rate, read from the engine at each scrape."""
        self.registry.register(_SpeculationCollector(engine))

    def watch_failover(self, state: FailoverState, replicas: int) -> None:
        """Failovers, rejoins, time degraded and who computed lost experts, read from `state` at each scrape."""
        self.registry.register(_FailoverCollector(state, replicas))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FailoverCollector:
    def __init__(self, state: FailoverState, replicas: int):
        self.state, self.replicas = state, replicas

    def collect(self):
        failovers = CounterMetricFamily("kimi_worker_failovers", "Times a worker failed and others took over its "
                                        "experts", labels=["node"])
        rejoins = CounterMetricFamily("kimi_worker_rejoins", "Times a failed worker came back and took its experts "
                                      "again", labels=["node"])
        for node, count in self.state.failovers.items():
            failovers.add_metric([node], count)
        for node, count in self.state.rejoins.items():
            rejoins.add_metric([node], count)
        yield failovers
        yield rejoins
        yield CounterMetricFamily("kimi_degraded_seconds", "Seconds with at least one worker down",
                                  value=self.state.degraded_seconds())
        yield CounterMetricFamily("kimi_fallback_expert_activations", "(token, expert) pairs of down workers that "
                                  "the head computed from its own mapping of the file", value=self.state.fallback_pairs)
        yield CounterMetricFamily("kimi_replica_expert_activations", "(token, expert) pairs of down workers computed "
                                  "from replicas", value=self.state.replica_pairs)
        yield GaugeMetricFamily("kimi_workers_down", "Workers down now", value=len(self.state.down))
        yield GaugeMetricFamily("kimi_expert_replicas", "Second copies of (layer, expert) placed on other nodes",
                                value=self.replicas)


class _PromptCacheCollector:
    def __init__(self, cache: PromptCache):
        self.cache = cache

    def collect(self):
        stats = self.cache.stats()
        yield GaugeMetricFamily("kimi_prompt_cache_entries", "Ended sequences' KV caches kept for reuse",
                                value=stats.kept)
        yield GaugeMetricFamily("kimi_prompt_cache_tokens", "Tokens whose KV the prompt cache holds",
                                value=stats.kept_tokens)
        yield GaugeMetricFamily("kimi_prompt_cache_bytes", "Bytes of KV the prompt cache holds", value=stats.kept_bytes)
        yield CounterMetricFamily("kimi_prompt_cache_evictions", "Kept caches dropped for room",
                                  value=stats.evictions)
        yield CounterMetricFamily("kimi_prompt_cache_loaded", "Prompts read from --prompt-cache-dir's files",
                                  value=stats.loaded)
        yield GaugeMetricFamily("kimi_prompt_cache_disk_bytes", "Bytes of --prompt-cache-dir's files",
                                value=stats.stored_bytes)
        yield CounterMetricFamily("kimi_prompt_rows_shared", "Reused KV rows read from the earlier cache's own "
                                  "memory, not copied", value=stats.rows_shared)
        yield CounterMetricFamily("kimi_prompt_rows_copied", "Reused KV rows copied (past the last whole page "
                                  "shared, or read from disk)", value=stats.rows_copied)


class _SpeculationCollector:
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        drafted, accepted = self.engine.drafted_tokens, self.engine.accepted_tokens
        yield CounterMetricFamily("kimi_drafted_tokens", "Tokens drafted from the context and checked in a step "
                                  "(speculative decoding)", value=drafted)
        yield CounterMetricFamily("kimi_accepted_tokens", "Drafted tokens that the model's own choice confirmed: "
                                  "tokens had without a step of their own", value=accepted)
        yield GaugeMetricFamily("kimi_draft_acceptance_rate", "Accepted over drafted tokens since the start (0 "
                                "before any draft)", value=accepted / drafted if drafted else 0.0)
