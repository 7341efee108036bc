"""The last minutes of serving speed, for the dashboard: every few seconds, what the metrics' counters moved
by since the sample before (tokens decoded and prefilled per second, time to first token, prompt reuse,
drafted tokens accepted, each worker's round trip) and the engine's running and waiting sequences.
"""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry

from runtime.engine import Engine

SAMPLE_EVERY_S = 2.0
KEPT_S = 600  # ten minutes


def counter_values(registry: CollectorRegistry) -> dict[tuple[str, str | None], float]:
    """(sample name, node label or None) -> value, for every sample the registry has now."""
    return {(sample.name, sample.labels.get("node")): sample.value
            for family in registry.collect() for sample in family.samples}


class SpeedHistory:
    def __init__(self, registry: CollectorRegistry, kept_s: float = KEPT_S, every_s: float = SAMPLE_EVERY_S):
        self.registry = registry
        self.samples: deque[dict] = deque(maxlen=int(kept_s / every_s))
        self._last: dict | None = None
        self._last_at = 0.0

    def sample(self, engine: Engine) -> None:
        now, values = time.monotonic(), counter_values(self.registry)
        if self._last is not None:
            self.samples.append(self._rates(values, now - self._last_at, engine))
        self._last, self._last_at = values, now

    def _rates(self, values: dict, seconds: float, engine: Engine) -> dict:
        def moved(name: str, node: str | None = None) -> float:
            return values.get((name, node), 0.0) - self._last.get((name, node), 0.0)

        prompt, reused = moved("kimi_prompt_tokens_total"), moved("kimi_prompt_tokens_reused_total")
        drafted = moved("kimi_drafted_tokens_total")
        first_tokens = moved("kimi_time_to_first_token_seconds_count")
        nodes = sorted(node for name, node in values if name == "kimi_worker_round_trip_seconds_count")
        round_trips = {}
        for node in nodes:
            calls = moved("kimi_worker_round_trip_seconds_count", node)
            if calls:
                round_trips[node] = moved("kimi_worker_round_trip_seconds_sum", node) / calls * 1000
        return {"time": time.time(), "decode_tps": moved("kimi_generated_tokens_total") / seconds,
                "prefill_tps": (prompt - reused) / seconds,
                "ttft_s": moved("kimi_time_to_first_token_seconds_sum") / first_tokens if first_tokens else None,
                "running": engine.num_running, "waiting": engine.num_waiting,
                "prompt_reuse": reused / prompt if prompt else None,
                "draft_acceptance": moved("kimi_accepted_tokens_total") / drafted if drafted else None,
                "round_trip_ms": round_trips}
