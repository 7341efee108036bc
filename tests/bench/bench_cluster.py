"""Expert parallelism against one process and llama.cpp, side by side, on the k2-slice file.

    python tests/bench/bench_cluster.py [MODEL.gguf] [--workers 2] [--rounds R] [--tokens N]

Each round runs, in fresh processes one after the other: `kimi-cluster generate` in one process,
`kimi-cluster generate --workers N` (a local Ray with N expert workers, the head keeping its share), and
llama.cpp; medians of decode tokens/s are compared. Then the median per-layer gRPC round trip on loopback
is measured for 1 and 16 tokens of K2 width: transport alone (the worker is sent the rows but no expert),
and with 4 of the worker's experts computed per row; beside them, the floor: a bare grpc.aio echo of as
many bytes between two processes.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import queue
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (LLAMA_SCRIPT, bench_model, bench_parser, median_decode_speeds,  # noqa: E402
                          prompt_of_exact_length)

from cluster.transport import ExpertServicer, RemoteExperts, WorkerClient, serve  # noqa: E402
from protos import expert_pb2  # noqa: E402
from runtime.experts import ExpertShard  # noqa: E402
from runtime.ggml_ops import GgmlRunner  # noqa: E402
from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

TOKEN = "bench-token"


def serve_half_of_layer_one(path: str, ports) -> None:
    """A worker process holding experts 8..15 of layer 1, as an ExpertWorker would."""
    shard = ExpertShard.from_model_file(GGUFModelFile(path), GgmlRunner(1), {1: range(8, 16)})
    shard.touch()
    _, port = serve(ExpertServicer("bench-worker", lambda: shard, None, lambda: {}), 0, TOKEN)
    ports.put(port)
    time.sleep(3600)


def serve_bare_echo(ports) -> None:
    """The floor: a grpc.aio stream that echoes raw bytes (no protobuf, no token check, no work)."""
    async def echo(requests, context):
        async for request in requests:
            yield request

    async def main():
        server = grpc.aio.server(handlers=[grpc.method_handlers_generic_handler("bench.Echo", {
            "Stream": grpc.stream_stream_rpc_method_handler(echo)})])
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await asyncio.sleep(3600)
    asyncio.run(main())


def bare_echo_round_trip(payload_bytes: int) -> float:
    """Median seconds for one payload there and back through serve_bare_echo, sent as WorkerClient sends."""
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_bare_echo, args=(ports,), daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    replies = channel.stream_stream("/bench.Echo/Stream")(iter(requests.get, None))
    payload, times = bytes(payload_bytes), []
    for _ in range(1000):
        started = time.perf_counter()
        requests.put(payload)
        next(replies)
        times.append(time.perf_counter() - started)
    requests.put(None)
    channel.close()
    server.terminate()
    return statistics.median(times[100:])


def round_trips(path: Path) -> None:
    ports = multiprocessing.Queue()
    worker = multiprocessing.Process(target=serve_half_of_layer_one, args=(str(path), ports), daemon=True)
    worker.start()
    client = WorkerClient("bench-worker", f"127.0.0.1:{ports.get(timeout=120)}", TOKEN, 30)
    remote = RemoteExperts({1: np.array([-1] * 8 + [0] * 8, np.int32)}, [client], None)
    n_embd = GGUFModelFile(path).info("token_embd.weight").ne[0]
    print(f"\nper-layer round trip over gRPC on loopback (n_embd {n_embd}, f32 on the wire), median:")
    for num_tokens in (1, 16):
        hidden = np.random.default_rng(0).standard_normal((num_tokens, n_embd), dtype=np.float32)
        times = []
        for step in range(1, 301):
            request = expert_pb2.ForwardRequest(layer=1, step=step, num_rows=num_tokens, hidden=hidden.tobytes())
            started = time.perf_counter()
            client.send(request)
            client.receive(step)
            times.append(time.perf_counter() - started)
        transport = statistics.median(times[50:])
        ids, weights = np.tile(np.arange(8, 12, dtype=np.int32), (num_tokens, 1)), np.ones((num_tokens, 4), np.float32)
        times = []
        for _ in range(12):
            started = time.perf_counter()
            remote.start(1, hidden, ids, weights)()
            times.append(time.perf_counter() - started)
        print(f"  {num_tokens:2d} token(s): transport {1000 * transport:7.3f} ms   "
              f"with 4 experts computed on 1 thread {1000 * statistics.median(times[2:]):8.2f} ms   "
              f"bare gRPC echo of as many bytes {1000 * bare_echo_round_trip(hidden.nbytes):7.3f} ms")
    worker.terminate()


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    model = bench_model(args.model)
    text, ids = prompt_of_exact_length(Tokenizer.from_metadata(GGUFModelFile(model).metadata))
    generate = [sys.executable, "-m", "cluster.cli", "generate", str(model), "--prompt", text, "--max-tokens",
                str(args.tokens), "--json", "--threads", str(args.threads)]
    runs = {
        "one process": generate,
        f"{args.workers} workers": generate + ["--workers", str(args.workers), "--worker-memory", "2",
                                               "--head-memory", "4"],
        "llama.cpp": [sys.executable, "-c", LLAMA_SCRIPT,
                      json.dumps({"model": str(model), "prompt": ids, "tokens": args.tokens, "threads": args.threads})],
    }
    print(f"model: {model}, threads: {args.threads}, generate: {args.tokens} tokens, rounds: {args.rounds} (+1 warm-up)")
    results = median_decode_speeds(runs, args.rounds)
    single, llama = results["one process"], results["llama.cpp"]
    print("\nmedian decode tokens/s      tokens/s   vs one process   vs llama.cpp")
    for name, value in results.items():
        print(f"  {name:24s} {value:9.2f} {value / single:13.2f}x {value / llama:13.2f}x")
    round_trips(model)


if __name__ == "__main__":
    main()
