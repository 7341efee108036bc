"""The dashboard's speed history: what the metrics moved by between two samples."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.server.metrics import ServerMetrics
from cluster.server.speed_history import SpeedHistory


def test_a_sample_is_what_the_counters_moved_by_since_the_one_before():
    metrics = ServerMetrics()
    engine = SimpleNamespace(num_running=2, num_waiting=1, drafted_tokens=0, accepted_tokens=0)
    metrics.watch_speculation(engine)
    history = SpeedHistory(metrics.registry, kept_s=6, every_s=2)
    history.sample(engine)
    assert not history.samples  # the first sample is only where the counting starts
    metrics.prompt_tokens.inc(100)
    metrics.reused_prompt_tokens.inc(25)
    metrics.generated_tokens.inc(10)
    metrics.time_to_first_token.observe(0.5)
    metrics.time_to_first_token.observe(1.5)
    metrics.observe_experts("w1", pairs=8, round_trip_s=0.002)
    metrics.observe_experts("w1", pairs=8, round_trip_s=0.004)
    engine.drafted_tokens, engine.accepted_tokens = 8, 6
    history.sample(engine)
    (sample,) = history.samples
    assert sample["ttft_s"] == 1.0 and sample["prompt_reuse"] == 0.25 and sample["draft_acceptance"] == 0.75
    assert sample["round_trip_ms"] == {"w1": pytest.approx(3.0)}
    assert sample["running"] == 2 and sample["waiting"] == 1
    assert sample["decode_tps"] > 0 and sample["prefill_tps"] == pytest.approx(75 / 10 * sample["decode_tps"])
    for _ in range(4):
        history.sample(engine)
    assert len(history.samples) == 3  # kept_s / every_s
    assert history.samples[-1]["ttft_s"] is None and history.samples[-1]["round_trip_ms"] == {}
