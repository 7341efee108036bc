"""Failover inside a step, over real gRPC: a worker that dies, hangs or errors has its share computed by a
replica or by the head from its own mapping of the file, with the same bits as without the fault; a
worker that comes back takes its share again."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest

from cluster import routing_counts
from cluster.failover import FailoverState, HeadFallback
from cluster.transport import RemoteExperts, SharesLost
from runtime.experts import ExpertShard
from runtime.ggml_ops import GgmlRunner
from tests.expert_workers import SlowShard, model_file, routing, split_owners, start_worker  # noqa: F401 - fixtures

LAYERS = (1, 2)
SHARES = {0: list(range(0, 6)), 1: list(range(6, 11))}  # experts 11..15 stay on the head


@pytest.fixture(params=[False, True], ids=["mapped", "interleaved"])
def interleaved(request):
    return request.param


def shard(model_file, experts, interleaved, runner=None):
    return ExpertShard.from_model_file(model_file, runner or GgmlRunner(1), {layer: experts for layer in LAYERS},
                                       repack_experts=interleaved)


def cluster(model_file, start_worker, interleaved, replicas=None, fallback=True, deadline_s=5.0, slow=None):
    """Two workers and the head's share, as RemoteExperts with failover; `replicas` maps a worker index to
    the other experts it also holds."""
    workers = []
    for index, experts in SHARES.items():
        held = shard(model_file, sorted(set(experts) | set((replicas or {}).get(index, ()))), interleaved)
        workers.append(start_worker(f"w{index}", SlowShard(held, slow) if slow and index == 0 else held))
    remote = RemoteExperts(split_owners(LAYERS, SHARES), [w.client(deadline_s=deadline_s) for w in workers],
                           shard(model_file, list(range(11, 16)), interleaved),
                           fallback=HeadFallback(model_file, GgmlRunner(1), interleaved, grouped=False) if fallback else None,
                           replicas={i: {layer: e for layer in LAYERS} for i, e in (replicas or {}).items()},
                           state=FailoverState())
    return remote, workers


def steps(remote, num_steps=3, num_tokens=5):
    return [remote.start(layer, *routing(num_tokens, seed=step))() for step in range(num_steps) for layer in LAYERS]


def test_a_dead_workers_share_is_computed_by_the_head_with_the_same_bits(model_file, start_worker, interleaved):
    healthy, _ = cluster(model_file, start_worker, interleaved)
    expected = steps(healthy)
    remote, workers = cluster(model_file, start_worker, interleaved)
    assert all(np.array_equal(a, b) for a, b in zip(steps(remote, 1), expected))
    workers[0].server.stop(grace=None)
    got = steps(remote)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    report = remote.state.report()
    assert list(report) == ["w0"] and report["w0"]["covered_by"] == ["head (from its file)"]
    assert remote.state.failovers == {"w0": 1} and remote.state.fallback_pairs > 0


def test_a_replica_covers_a_dead_worker_without_the_heads_fallback(model_file, start_worker, interleaved):
    expected = steps(cluster(model_file, start_worker, interleaved)[0])
    remote, workers = cluster(model_file, start_worker, interleaved, replicas={1: SHARES[0]})
    workers[0].server.stop(grace=None)
    got = steps(remote)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert remote.state.report()["w0"]["covered_by"] == ["w1"]
    assert remote.state.fallback_pairs == 0 and remote.state.replica_pairs > 0


def test_a_share_split_between_a_partial_replica_and_the_head_keeps_its_bits(model_file, start_worker, interleaved):
    expected = steps(cluster(model_file, start_worker, interleaved)[0], num_tokens=9)
    remote, workers = cluster(model_file, start_worker, interleaved, replicas={1: SHARES[0][:3]})
    workers[0].server.stop(grace=None)
    got = steps(remote, num_tokens=9)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert remote.state.report()["w0"]["covered_by"] == ["head (from its file)", "w1"]
    assert remote.state.fallback_pairs > 0 and remote.state.replica_pairs > 0


def test_a_hung_worker_is_covered_after_its_deadline_and_its_late_answer_ignored(model_file, start_worker):
    expected = steps(cluster(model_file, start_worker, False)[0], 2)
    remote, _ = cluster(model_file, start_worker, False, deadline_s=1.0, slow=3.0)
    started = time.monotonic()
    got = steps(remote, 2)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert 1.0 <= time.monotonic() - started < 2.5  # one deadline, then no more waiting on it
    assert "deadline" in remote.state.report()["w0"]["reason"]


def test_a_worker_that_comes_back_takes_its_share_again(model_file, start_worker):
    expected = steps(cluster(model_file, start_worker, False)[0])
    remote, workers = cluster(model_file, start_worker, False)
    workers[0].server.stop(grace=None)
    assert all(np.array_equal(a, b) for a, b in zip(steps(remote), expected))
    fallback_pairs = remote.state.fallback_pairs
    back = start_worker("w0", shard(model_file, SHARES[0], False))
    remote.rejoin(0, back.client())
    answered = set()
    remote.observers.append(lambda node, pairs, seconds: answered.add(node))
    assert all(np.array_equal(a, b) for a, b in zip(steps(remote), expected))
    assert answered == {"w0", "w1", "head"} and remote.state.fallback_pairs == fallback_pairs
    assert remote.state.report() == {} and remote.state.rejoins == {"w0": 1}
    assert remote.state.degraded_seconds() > 0


def test_without_any_holder_the_step_fails_naming_the_node(model_file, start_worker):
    remote, workers = cluster(model_file, start_worker, False, fallback=False)
    workers[1].server.stop(grace=None)
    with pytest.raises(SharesLost, match=r"layer 1 have no holder left .*down: w1 \("):
        steps(remote, 1)


def test_routing_counts_are_kept_across_runs_for_replicas_auto(model_file, start_worker, tmp_path):
    remote, _ = cluster(model_file, start_worker, False)
    outputs = steps(remote, 3, num_tokens=5)
    assert len(outputs) == 6 and remote.routed.sum() == 3 * len(LAYERS) * 5 * 4  # steps x layers x tokens x k
    expected = np.zeros_like(remote.routed)
    for step in range(3):
        ids = routing(5, seed=step)[1]
        for layer in LAYERS:
            np.add.at(expected[layer], ids.ravel(), 1)
    assert np.array_equal(remote.routed, expected)
    assert routing_counts.load(model_file, remote.routed.shape, tmp_path) is None
    routing_counts.add(model_file, remote.routed, tmp_path)
    routing_counts.add(model_file, remote.routed, tmp_path)
    assert np.array_equal(routing_counts.load(model_file, remote.routed.shape, tmp_path), 2 * expected)
    assert routing_counts.load(model_file, (1, 2), tmp_path) is None  # another model's shape: not used


def test_the_console_hears_once_of_each_outage_and_of_each_return():
    lines = []
    state = FailoverState(announce=lines.append)
    state.failed("worker-a", "deadline of 3 s passed")
    state.failed("worker-a", "UNAVAILABLE")  # the same outage, seen by another request
    state.rejoined("worker-b")  # was not down: nothing to say
    state.rejoined("worker-a")
    assert len(lines) == 2
    assert lines[0] == "worker-a is down (deadline of 3 s passed); its experts are computed elsewhere until it is back"
    assert re.fullmatch(r"worker-a is back after \d+\.\d s and computes its experts again", lines[1])


def test_the_dashboard_keeps_each_failover_respread_and_rejoin_with_its_time():
    state = FailoverState()
    state.failed("worker-a", "UNAVAILABLE")
    state.reloading("worker-a", 30, 120)
    state.respread("worker-a", ["worker-b"], 30)
    report = state.report()["worker-a"]
    assert report["loading"] and report["loaded"] == 0.25 and report["taken_over_by"] == ["worker-b"]
    state.rejoined("worker-a")
    assert [event["kind"] for event in state.events] == ["failover", "respread", "rejoin"]
    assert all(event["node"] == "worker-a" and abs(event["time"] - time.time()) < 60 for event in state.events)
    assert state.events[1]["text"] == "worker-a is still down after 30 s: worker-b load its experts to compute them"
