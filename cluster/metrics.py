"""Prometheus metrics of a serving process (GET /metrics), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROUND_TRIP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kimi_requests", "API requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("kimi_prompt_tokens", "Prompt tokens processed", registry=r)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
