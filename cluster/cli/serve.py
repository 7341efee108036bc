"""`kimi-cluster serve` and `kimi-cluster demo`: the API, listening at once and answering once the model has
loaded (also behind `chat MODEL`)."""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path

from cluster.addresses import is_loopback
from cluster.cli.model_session import model_session
from cluster.cli.options import (DEFAULT_MAX_SEQUENCES, add_cluster_args, add_runtime_args, add_sampling_args,
                                 add_server_args, cluster_config, configured_api_key, sampling_params)
from cluster.placement import GiB

DEMO_PATH = Path.home() / ".cache" / "kimi-cluster" / "kimi-demo-tiny.gguf"
DEMO_PROMPT = "Write one sentence about pooling the memory of several computers."


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model with OpenAI's and Anthropic's APIs",
                       description="Bring the model up (on this machine, or with its experts spread over a Ray "
                                   "cluster) and serve /v1/completions, /v1/chat/completions, /v1/responses and "
                                   "/v1/models as OpenAI's API does, /v1/messages as Anthropic's does, plus /health "
                                   "and /metrics (Prometheus), a live dashboard of the cluster at / (its data: "
                                   "/status) and a chat page at /chat. Requests share decode steps (continuous "
                                   "batching).")
    p.add_argument("model", help="path to the .gguf file (or its -00001-of-0000N.gguf part)")
    add_server_args(p)
    add_runtime_args(p, serving=True)
    add_cluster_args(p)
    p.set_defaults(func=cmd_serve)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="serve the built-in demo model on 2 local expert workers and chat once",
                       description="Write the demo model if missing, start a local Ray cluster with 2 expert "
                                   "workers, serve it, send one chat completion through the API, print the reply "
                                   "and tokens/s, and keep serving until Ctrl-C (--once: exit after the reply).")
    p.add_argument("--model", default=str(DEMO_PATH), help="demo model path, written if missing (default %(default)s)")
    p.add_argument("--once", action="store_true", help="exit after the first reply")
    add_server_args(p)
    add_sampling_args(p)
    add_runtime_args(p, serving=True)
    add_cluster_args(p)
    # Quiet: an access line would land in the middle of the streamed reply it prints.
    p.set_defaults(func=cmd_demo, max_tokens=32, workers=2, model_name="kimi-demo", quiet=True)


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> None:
    """A server others on the network can reach needs a key, unless the user says otherwise."""
    if api_key or no_auth or is_loopback(host):
        return
    raise ValueError(f"--host {host} makes the API reachable from your network, and no API key is set, so anyone "
                     "who reaches it could use the model. Give --api-key KEY (or $KIMI_API_KEY, or api_key in the "
                     "cluster config), or --no-auth to serve without a key on purpose")


def _print_access_line(line: str) -> None:
    print(f"kimi-cluster: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def serving(args, host: str, port: int, announce: bool = True):
    """Listen at once (GET /health says "loading"), bring the model up, then serve; yields the base URL.
    announce: say where it listens and log each request (off for the private server behind `chat MODEL`)."""
    from cluster.cluster_view import cluster_view, single_process_view
    from cluster.server.app import ApiServer
    from cluster.server.service import Service
    from runtime.engine import Engine
    from runtime.gguf_file import GGUFModelFile
    from runtime.speculative import parse_speculate
    from runtime.tokenizer import Tokenizer
    config = cluster_config(args)
    max_sequences = config.max_sequences if config is not None else args.max_sequences or DEFAULT_MAX_SEQUENCES
    if not 1 <= max_sequences < args.step_tokens:
        raise ValueError(f"--step-tokens ({args.step_tokens}) must exceed --max-sequences ({max_sequences}), "
                         "which must be at least 1: every running sequence takes a row of each step")
    api_key = configured_api_key(args, config)
    check_exposure(host, api_key, args.no_auth)
    model_file = GGUFModelFile(args.model)
    service = Service(args.model_name or Path(args.model).name.split("-0000")[0].removesuffix(".gguf"),
                      Tokenizer.from_metadata(model_file.metadata),
                      int(model_file.metadata.get("deepseek2.context_length", 0)),
                      quantization=file_quantization(model_file), file_bytes=model_file.file_bytes, api_key=api_key,
                      protect_metrics=args.protect_metrics, strict_model_name=args.strict_model_name,
                      access_log=None if not announce or args.quiet else _print_access_line)
    server = ApiServer(service, host, port)
    url = f"http://{host}:{server.start()}"
    if announce:
        print(f"kimi-cluster: {url}/v1 answers for '{service.model_name}' once the model has loaded "
              f"({max_sequences} sequences at once, {args.step_tokens} token rows per step, API key "
              f"{'required' if service.api_key else 'not required'})", file=sys.stderr)
        print(f"kimi-cluster: the cluster's dashboard is at {url}/ and a chat page at {url}/chat", file=sys.stderr)
    else:
        print(f"loading {args.model} ...", file=sys.stderr)

    def watch(cluster) -> None:
        """The dashboard shows the nodes while they load."""
        service.cluster_view = functools.partial(cluster_view, cluster)

    session = model_session(args, config, max_sequences, model_file, service.tokenizer, on_cluster=watch)
    try:
        with session as (model, _, cluster, kv):
            if cluster is not None:
                cluster.remote.observers.append(service.metrics.observe_experts)
                service.metrics.watch_failover(cluster.failover, cluster.placement.replica_count)
            prompt_cache = prompt_cache_for(args, model, kv)
            engine = Engine(model, kv.context, max_sequences=max_sequences, max_step_tokens=args.step_tokens,
                            prompt_cache=prompt_cache,
                            max_draft=parse_speculate(args.speculate, experts_remote=cluster is not None))
            if prompt_cache is not None:
                service.metrics.watch_prompt_cache(prompt_cache)
            if announce:
                print(f"kimi-cluster: {kv.describe(model.config.context_length)}", file=sys.stderr)
            if cluster is not None:
                service.ready(engine, cluster.status, service.cluster_view)
            else:
                service.ready(engine, cluster_view=functools.partial(single_process_view, model_file))
            try:
                yield url
            finally:
                engine.stop()
                if prompt_cache is not None and prompt_cache.store is not None:
                    prompt_cache.store.flush()  # the last kept prompts reach the disk before the process ends
    except Exception as e:
        service.load_error = str(e)
        raise
    finally:
        server.stop()


def file_quantization(model_file) -> str | None:
    """The file's type as llama.cpp's quantizer names it (general.file_type: "Q4_K_M"); None if it does not say."""
    from gguf import LlamaFileType
    try:
        name = LlamaFileType(int(model_file.metadata["general.file_type"])).name  # MOSTLY_Q4_K_M, ALL_F32
    except (KeyError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def prompt_cache_for(args, model, kv):
    """The prompt cache: `--prompt-cache-gb` of its own, or by default the plan's KV memory (kv: KVPlan), less
    what the running sequences may hold at the time; None when --prompt-cache-gb is 0. With
    `--prompt-cache-dir`, its files too."""
    from runtime.prompt_cache import PromptCache
    from runtime.prompt_store import PromptStore, model_identity
    budget = kv.pool_bytes if args.prompt_cache_gb is None else int(args.prompt_cache_gb * GiB)
    if budget <= 0:
        return None
    store = None if args.prompt_cache_dir is None else \
        PromptStore(args.prompt_cache_dir, model_identity(model.file), int(args.prompt_cache_disk_gb * GiB))
    return PromptCache(budget, kv.bytes_per_token, store, shares_with_running=args.prompt_cache_gb is None)


def wait_for_ctrl_c() -> None:
    while True:
        time.sleep(3600)


def cmd_serve(args) -> None:
    from cluster.server.app import paths_served
    with serving(args, args.host, args.port) as url:
        print(f"kimi-cluster: ready at {url}/v1 (serving {paths_served()}); Ctrl-C stops", file=sys.stderr)
        wait_for_ctrl_c()


def cmd_demo(args) -> None:
    from cluster.cli.api_client import stream_chat
    from runtime.synthetic.demo_model import make_model
    sampling_params(args)
    path = Path(args.model)
    if not path.exists():
        print(f"writing the demo model to {path} ...", file=sys.stderr)
        make_model(path, preset="tiny")
    args.model = str(path)
    with serving(args, args.host, args.port) as url:
        print(f"prompt: {DEMO_PROMPT}\nreply (random weights, so the words are random too):")
        started, first_at, usage = time.perf_counter(), None, {}
        for choice in stream_chat(url, [{"role": "user", "content": DEMO_PROMPT}], args.api_key,
                                  max_tokens=args.max_tokens, temperature=args.temperature):
            usage = choice.get("usage", usage)
            text = choice.get("delta", {}).get("content") or ""
            if text and first_at is None:
                first_at = time.perf_counter()
            print(text, end="", flush=True)
        print(f"\n[{_demo_speed(usage.get('completion_tokens', 0), started, first_at, time.perf_counter())}, "
              f"through the API with the experts on {args.workers} workers]")
        if args.once:
            return
        print(f"serving at {url}/v1 (try: kimi-cluster chat --url {url}); Ctrl-C stops", file=sys.stderr)
        wait_for_ctrl_c()


def _demo_speed(tokens: int, started: float, first_at: float | None, ended: float) -> str:
    """The first token (prompt processing and the first step) apart from the decode rate after it."""
    if first_at is None or tokens < 2:
        return f"{tokens} tokens in {ended - started:.2f} s"
    return (f"first token after {first_at - started:.2f} s, then {tokens - 1} tokens at "
            f"{(tokens - 1) / (ended - first_at):.1f} tokens/s")
