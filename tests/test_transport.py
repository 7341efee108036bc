"""gRPC transport over real sockets: RemoteExperts against in-process shards, auth, failures, wire dtypes,
and shards streamed from the head."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cluster import shard_transfer
from cluster.config import TLSFiles
from cluster.security.certs import CA_CERT, NODE_CERT, NODE_KEY, parse_nodes, write_certificates
from cluster.transport import INLINE_PAIRS, RemoteExperts, WorkerFailed
from runtime.experts import ExpertShard, LocalExperts
from runtime.ggml_ops import GgmlRunner, RepackedWeight
from runtime.gguf_file import GGUFModelFile
from tests.expert_workers import SlowShard, model_file, routing, split_owners, start_worker  # noqa: F401 - fixtures


@pytest.mark.parametrize("num_tokens", [1, 7])
def test_remote_plus_head_share_equals_local(model_file, start_worker, num_tokens):
    runner = GgmlRunner(2)
    layers = (1, 2)
    shares = {0: list(range(0, 6)), 1: list(range(6, 11))}  # experts 11..15 stay on the head
    workers = [start_worker(f"w{i}", ExpertShard.from_model_file(model_file, runner, {l: e for l in layers}))
               for i, e in shares.items()]
    head_share = ExpertShard.from_model_file(model_file, runner, {l: range(11, 16) for l in layers})
    remote = RemoteExperts(split_owners(layers, shares), [w.client() for w in workers], head_share)
    local = LocalExperts(model_file, runner, layers, 16)
    seen = []
    remote.observers.append(lambda node, pairs, seconds: seen.append((node, pairs, seconds)))
    hidden, ids, weights = routing(num_tokens)
    for layer in layers:
        expected = local.start(layer, hidden, ids, weights)()
        got = remote.start(layer, hidden, ids, weights)()
        # Partial sums from three places are added in another order than one sum over the slots.
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # Every (token, expert) pair was computed by exactly one place, and each worker's round trip was timed.
    assert sum(pairs for _, pairs, _ in seen) == len(layers) * ids.size
    assert {node for node, _, seconds in seen if seconds is not None} <= {"w0", "w1"}
    assert all(seconds is None for node, _, seconds in seen if node == "head")
    remote.close()


def test_one_worker_holding_everything_is_exact(model_file, start_worker):
    runner = GgmlRunner(2)
    worker = start_worker("w0", ExpertShard.from_model_file(model_file, runner, {1: range(16)}))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client()], None)
    hidden, ids, weights = routing(5)
    expected = LocalExperts(model_file, runner, (1,), 16).start(1, hidden, ids, weights)()
    assert np.array_equal(remote.start(1, hidden, ids, weights)(), expected)


@pytest.mark.parametrize("wire_dtype, tolerance", [("f16", 1.5e-2), ("bf16", 5e-2)])
def test_narrow_wire_dtypes(model_file, start_worker, wire_dtype, tolerance):
    runner = GgmlRunner(2)
    worker = start_worker("w0", ExpertShard.from_model_file(model_file, runner, {1: range(16)}))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client()], None, wire_dtype)
    hidden, ids, weights = routing(3)
    expected = LocalExperts(model_file, runner, (1,), 16).start(1, hidden, ids, weights)()
    got = remote.start(1, hidden, ids, weights)()
    # The hidden rows and partial sums travel rounded to 11 (f16) or 8 (bf16) significant bits; the rounded
    # rows then cross ggml's 8-bit activation rounding, which turns some of that into whole steps.
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()
    assert not np.array_equal(got, expected)


def test_health_answers_while_a_big_request_computes(model_file, start_worker):
    runner = GgmlRunner(1)
    worker = start_worker("w-slow", SlowShard(ExpertShard.from_model_file(model_file, runner, {1: range(16)}), 2.0))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client()], None)
    hidden, ids, weights = routing(INLINE_PAIRS // 4 + 1)  # 4 experts per row: just over the inline limit
    pending = remote.start(1, hidden, ids, weights)
    time.sleep(0.3)
    asked = time.perf_counter()
    assert worker.client().health(timeout_s=1.0).ready
    assert time.perf_counter() - asked < 1.0
    expected = LocalExperts(model_file, runner, (1,), 16).start(1, hidden, ids, weights)()
    assert np.array_equal(pending(), expected)


def test_wrong_token_is_refused(model_file, start_worker):
    worker = start_worker("w0", ExpertShard.from_model_file(model_file, GgmlRunner(1), {1: range(16)}))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client(token="wrong")], None)
    with pytest.raises(WorkerFailed, match="node w0 failed: UNAUTHENTICATED"):
        remote.start(1, *routing(2))()
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        worker.client(token="wrong").health()


def test_a_stopped_worker_fails_fast_with_its_name(model_file, start_worker):
    worker = start_worker("w-dead", ExpertShard.from_model_file(model_file, GgmlRunner(1), {1: range(16)}))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client(deadline_s=3)], None)
    remote.start(1, *routing(2))()
    worker.server.stop(grace=None)
    with pytest.raises(WorkerFailed, match="node w-dead failed"):
        remote.start(1, *routing(2))()


def test_a_worker_missing_an_expert_says_so(model_file, start_worker):
    worker = start_worker("w0", ExpertShard.from_model_file(model_file, GgmlRunner(1), {1: range(8)}))
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client()], None)
    with pytest.raises(WorkerFailed, match="does not hold experts"):
        remote.start(1, *routing(4))()


def test_streamed_shard_serves_like_the_file(model_file, start_worker, tmp_path):
    runner = GgmlRunner(2)
    owned = {1: [0, 3, 5, 9, 12], 2: [1, 2, 15]}
    worker = start_worker("w-nofile", None)
    worker.cache_dir = tmp_path / "cache"
    client = worker.client()
    manifest = shard_transfer.build_manifest(model_file, owned)
    assert client.load_shard(shard_transfer.stream_shard(model_file, manifest)) == manifest["total_bytes"]
    assert manifest["total_bytes"] == sum(model_file.expert_bytes(l, e) for l, es in owned.items() for e in es)
    from_file = ExpertShard.from_model_file(model_file, runner, owned)
    hidden, _, _ = routing(3)
    rows, experts, weights = np.array([0, 0, 1, 2], np.int32), np.array([3, 12, 0, 9], np.int32), \
        np.array([0.5, 0.25, 1.0, 2.0], np.float32)
    assert np.array_equal(worker.shard.forward_pairs(1, hidden, rows, experts, weights),
                          from_file.forward_pairs(1, hidden, rows, experts, weights))
    # A second load of the same shard reuses the verified cache file.
    cached = list((tmp_path / "cache").glob("*.shard"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    client.load_shard(shard_transfer.stream_shard(model_file, shard_transfer.build_manifest(model_file, owned)))
    assert cached[0].stat().st_mtime_ns == mtime


def test_an_interleaved_shard_copies_only_its_own_experts(model_file):
    runner, owned = GgmlRunner(2), {1: [12, 3, 9], 2: [0, 15]}
    plain = ExpertShard.from_model_file(model_file, runner, owned)
    heard: list[int] = []  # progress: bytes copied while interleaving, then the rest as touch() reads it
    interleaved = ExpertShard.from_model_file(model_file, runner, owned, repack_experts=True, on_bytes=heard.append)
    assert heard
    interleaved.touch(heard.append)
    for layer, experts in owned.items():
        assert all(w.ne[-1] == len(experts) for w in interleaved.tensors[layer].values())
        assert list(interleaved.owned(layer)) == sorted(experts)
    assert sum(heard) == interleaved.nbytes == plain.nbytes == sum(model_file.expert_bytes(l, e)
                                                                    for l, es in owned.items() for e in es)
    hidden, _, _ = routing(3)
    rows, experts, weights = np.array([0, 1, 1, 2], np.int32), np.array([12, 3, 9, 12], np.int32), \
        np.array([0.5, 1.0, 0.25, 2.0], np.float32)
    expected = plain.forward_pairs(1, hidden, rows, experts, weights)
    got = interleaved.forward_pairs(1, hidden, rows, experts, weights)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()  # interleaved kernels round differently
    with pytest.raises(KeyError, match="does not hold experts"):
        interleaved.forward_pairs(1, hidden, rows[:1], np.array([4], np.int32), weights[:1])


def test_streamed_shard_can_be_interleaved_like_the_file(model_file, tmp_path):
    owned = {1: [2, 7, 11], 2: [0, 15]}
    manifest = shard_transfer.build_manifest(model_file, owned)
    path, manifest = shard_transfer.receive_shard(shard_transfer.stream_shard(model_file, manifest), tmp_path)
    runner = GgmlRunner(2)
    streamed = shard_transfer.load_shard(path, manifest, runner, repack_experts=True)
    from_file = ExpertShard.from_model_file(model_file, runner, owned, repack_experts=True)
    assert any(isinstance(w, RepackedWeight) for kinds in streamed.tensors.values() for w in kinds.values())
    hidden, _, _ = routing(3)
    rows, experts, weights = np.array([0, 1, 2], np.int32), np.array([7, 11, 2], np.int32), np.ones(3, np.float32)
    assert np.array_equal(streamed.forward_pairs(1, hidden, rows, experts, weights),
                          from_file.forward_pairs(1, hidden, rows, experts, weights))


def test_corrupted_cache_is_replaced(model_file, tmp_path):
    owned = {1: [4, 5]}
    manifest = shard_transfer.build_manifest(model_file, owned)
    path, manifest = shard_transfer.receive_shard(shard_transfer.stream_shard(model_file, manifest), tmp_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not shard_transfer.verify(path, manifest)
    path2, _ = shard_transfer.receive_shard(
        shard_transfer.stream_shard(model_file, shard_transfer.build_manifest(model_file, owned)), tmp_path)
    assert path2 == path and shard_transfer.verify(path, manifest)


def test_mutual_tls_carries_the_stream_and_refuses_strangers(model_file, start_worker, tmp_path):
    """A worker with the cluster's certificates (`kimi-cluster certs`) serves a head that shows one from the
    same CA and the cluster token; every other client gets nowhere and is told so."""
    runner = GgmlRunner(2)
    ours, theirs = (TLSFiles(folder / NODE_CERT, folder / NODE_KEY, folder / CA_CERT)
                    for folder in (tmp_path / "ours", tmp_path / "theirs"))
    write_certificates(tmp_path / "ours", parse_nodes("head=127.0.0.1,w-tls=127.0.0.1"))
    write_certificates(tmp_path / "theirs", parse_nodes("head=127.0.0.1"))
    worker = start_worker("w-tls", ExpertShard.from_model_file(model_file, runner, {1: range(16)}),
                          tls=ours.for_node("w-tls"))
    head = ours.for_node("head")
    remote = RemoteExperts(split_owners((1,), {0: list(range(16))}), [worker.client(tls=head)], None)
    hidden, ids, weights = routing(4)
    expected = LocalExperts(model_file, runner, (1,), 16).start(1, hidden, ids, weights)()
    assert np.array_equal(remote.start(1, hidden, ids, weights)(), expected)
    assert worker.client(tls=head).health().ready
    strangers = {
        "plaintext": worker.client(deadline_s=3),
        "no certificate": worker.client(deadline_s=3, tls={"ca": head["ca"]}),
        "a certificate from another CA": worker.client(deadline_s=3, tls={**theirs.for_node("head"),
                                                                          "ca": head["ca"]}),
        "trusting another CA": worker.client(deadline_s=3, tls=theirs.for_node("head")),
    }
    for why, stranger in strangers.items():
        with pytest.raises(Exception, match="UNAVAILABLE"):
            stranger.health()
            pytest.fail(f"a client with {why} got through")
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        worker.client(token="not-the-token", deadline_s=3, tls=head).health()
    key_mode = (tmp_path / "ours" / "w-tls-key.pem").stat().st_mode & 0o777
    assert key_mode == 0o600 and (tmp_path / "ours").stat().st_mode & 0o077 == 0