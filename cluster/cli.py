"""kimi-cluster command line: serve, chat, generate, plan, probe, certs, inspect, make-model, demo."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from cluster.addresses import is_loopback

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
DEMO_PATH = Path.home() / ".cache" / "kimi-cluster" / "kimi-demo-tiny.gguf"
DEMO_PROMPT = "Write one sentence about pooling the memory of several computers."
DEFAULT_CONTEXT, DEFAULT_MAX_SEQUENCES = 4096, 16
REPLICA_PRESET = "k2.6-replica"


def _cluster_config(args):
    """The cluster settings for --config FILE or --workers N (None for a single process). --context and
    --max-sequences, when given, win over the file's: the head's KV cache is planned for what will run."""
    from cluster.config import ClusterConfig
    if args.config:
        config = ClusterConfig.from_yaml(args.config)
    elif args.workers:
        config = ClusterConfig.from_dict({"model": args.model, "reserve_gb": args.reserve_gb}, "--workers")
    else:
        return None
    given = {"context": getattr(args, "context", None), "max_sequences": getattr(args, "max_sequences", None),
             "replicas": getattr(args, "replicas", None), "allow_disk": getattr(args, "allow_disk", None)}
    return dataclasses.replace(config, **{key: value for key, value in given.items() if value is not None})


def _context(args, config) -> int:
    return config.context if config is not None else args.context or DEFAULT_CONTEXT


def _api_key(args, config) -> str | None:
    """--api-key (or $KIMI_API_KEY), else the cluster config's api_key, else None (no key asked)."""
    return args.api_key or (config.api_key if config is not None else None)


def _check_exposure(host: str, api_key: str | None, no_auth: bool) -> None:
    """A server others on the network can reach needs a key, unless the user says otherwise."""
    if api_key or no_auth or is_loopback(host):
        return
    raise ValueError(f"--host {host} makes the API reachable from your network, and no API key is set, so anyone "
                     "who reaches it could use the model. Give --api-key KEY (or $KIMI_API_KEY, or api_key in the "
                     "cluster config), or --no-auth to serve without a key on purpose")


@contextlib.contextmanager
def _model_session(args, config, model_file=None, tokenizer=None):
    """(model, tokenizer, cluster): in this process (config None, cluster None), or with its experts spread
    over a Ray cluster. model_file and tokenizer: already opened ones to reuse (a real GGUF's header takes
    seconds)."""
    from runtime.ggml_ops import GgmlRunner
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import KimiModel
    from runtime.tokenizer import Tokenizer
    model_file = model_file or GGUFModelFile(args.model)
    tokenizer = tokenizer or Tokenizer.from_metadata(model_file.metadata)
    if config is None:
        from cluster.failover import available_memory_bytes
        available = available_memory_bytes()
        model = KimiModel(model_file, GgmlRunner(args.threads), progress=sys.stderr.isatty(),
                          repack=_repack_that_fits(args.repack, model_file, available))
        if not _experts_fit(model_file, available):  # paged from disk: see ExpertShard.read_on_demand
            model.experts.read_on_demand(model_file)
        model.load(progress=sys.stderr.isatty())
        yield model, tokenizer, None
        return
    from cluster.head import ExpertCluster
    with ExpertCluster(args.model, config, local_workers=args.workers or 0, worker_memory_gb=args.worker_memory,
                       head_memory_gb=args.head_memory, repack=args.repack, worker_threads=args.threads,
                       progress=sys.stderr.isatty()) as cluster:
        model = cluster.start()
        print(cluster.placement.format_table(), file=sys.stderr)
        yield model, tokenizer, cluster


def _repack_that_fits(repack: str, model_file, available_bytes: int | None = None) -> str:
    """Interleaved experts are copies in RAM. When they would not fit in this machine's free memory, read
    them in place instead (mapped pages, which the OS can drop and read again) rather than fail to load."""
    if repack not in ("experts", "all"):
        return repack
    if available_bytes is None:
        from cluster.failover import available_memory_bytes
        available_bytes = available_memory_bytes()
    if _experts_fit(model_file, available_bytes):
        return repack
    fallback = {"experts": "none", "all": "head"}[repack]
    print(f"kimi-cluster: the routed experts ({model_file.routed_expert_bytes() / 2**30:.1f} GiB) do not fit in "
          f"this machine's {available_bytes / 2**30:.1f} GiB of free memory, so they are read in place from the "
          f"file rather than interleaved (--repack {fallback})", file=sys.stderr)
    return fallback


def _experts_fit(model_file, available_bytes: int) -> bool:
    """Whether every routed expert fits in this much free memory (with a tenth to spare)."""
    return model_file.routed_expert_bytes() <= 0.9 * available_bytes


def _prompt_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    # As llama.cpp does for a raw prompt: special tokens parsed, BOS only if the file asks for it.
    return tokenizer.encode(text, parse_special=True)


def _sampling_params(args):
    """The sampling flags, checked before anything loads; errors name the flag."""
    from runtime.sampling import SamplingParamError, SamplingParams
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed)
    except SamplingParamError as e:
        flag = "--repeat-penalty" if e.field == "repetition_penalty" else "--" + e.field.replace("_", "-")
        raise ValueError(f"{flag} must be {e.allowed}, got {e.value!r}") from None


def cmd_generate(args) -> None:
    params = _sampling_params(args)
    config = _cluster_config(args)
    if config is not None:  # one sequence: the head plans a KV cache for one, not for a server's batch
        config = dataclasses.replace(config, max_sequences=1)
    with _model_session(args, config) as (model, tokenizer, _):
        _generate(args, params, model, tokenizer, _context(args, config))


def _generate(args, params, model, tokenizer, context: int) -> None:
    from runtime.engine import Engine, GenerationStats
    prompt = _prompt_tokens(tokenizer, args.prompt, args.chat)
    engine = Engine(model, context_size=min(context, model.config.context_length))
    stats = GenerationStats()
    decoder = tokenizer.stream_decoder() if not args.json else None
    tokens = []
    for token in engine.generate(prompt, args.max_tokens, params, frozenset(tokenizer.eog_ids), stats):
        tokens.append(token)
        if decoder is not None and token not in tokenizer.eog_ids:
            print(decoder.add(token), end="", flush=True)
    if args.logits_out:
        np.save(args.logits_out, stats.prompt_logits.astype(np.float32))
    text = tokenizer.decode([t for t in tokens if t not in tokenizer.eog_ids])
    if args.json:
        print(json.dumps({"prompt_tokens": prompt, "tokens": tokens, "text": text,
                          "tokens_per_s": round(stats.decode_tokens_per_s, 3),
                          "prompt_tokens_per_s": round(stats.prompt_tokens_per_s, 3),
                          "finish_reason": stats.finish_reason}))
        return
    print(decoder.flush())
    print(f"[prompt: {stats.prompt_tokens} tokens at {stats.prompt_tokens_per_s:.1f} tokens/s; "
          f"generated: {stats.generated_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s; "
          f"finish: {stats.finish_reason}]", file=sys.stderr)


def cmd_plan(args) -> None:
    """Print where every expert would live, and whether the pool is big enough, without loading anything."""
    from cluster.config import ClusterConfig
    from cluster.head import ExpertCluster, local_budgets
    from cluster.placement import PlacementError
    config = _cluster_config(args)
    if config is None:  # one process on this machine
        given = {"model": args.model, "reserve_gb": args.reserve_gb, "allow_disk": bool(args.allow_disk),
                 "context": args.context, "max_sequences": args.max_sequences}
        config = ClusterConfig.from_dict({k: v for k, v in given.items() if v is not None}, "this machine")
    cluster = ExpertCluster(args.model, config, progress=False)
    here = args.workers or not args.config  # this machine's processes, not the config's machines
    if args.estimate and not here and not config.nodes:
        raise ValueError(f"--estimate needs the machines listed under 'nodes' in {config.source}, each with the "
                         "`speed` that `kimi-cluster probe` printed on it")
    if here:
        budgets = local_budgets(args.workers, args.worker_memory, args.head_memory)
    elif config.nodes:
        budgets = config.node_budgets()
    else:
        with cluster:
            budgets = [n.budget for n in cluster.nodes()]
    try:
        placement = cluster.plan(budgets)
    except PlacementError as e:
        print(e)
        sys.exit(1)
    print(placement.format_table())
    print("fits: every expert has a place" + (" (some paged from disk)" if placement.disk_backed else "")
          + (f"; {placement.replica_count} second copies of workers' experts" if placement.replicas else ""))
    if args.estimate:
        from cluster.estimate import ModelCost, estimate
        cost = ModelCost.from_model(cluster.model_file, cluster.model_config)
        speeds = _local_speeds(args, cost, budgets) if here else _config_speeds(config, cost)
        print(estimate(cost, placement, speeds, args.streams, args.prompt_tokens, args.decode_context).format())
        print("(an estimate: routing taken as uniform, figures as probed; expect the real figure within about 30%)")


def _local_speeds(args, cost, budgets) -> dict:
    """Head and --workers on this machine, with this machine's probe (kept from `kimi-cluster probe`)."""
    from cluster.estimate import NodeSpeed
    from cluster.probe import probe_here
    speed = probe_here(cost, progress=_probe_progress)
    worker_threads = max(1, speed.cores // (args.workers + 1))
    return {b.name: NodeSpeed("this machine", speed, speed.cores if b.is_head else worker_threads) for b in budgets}


def _config_speeds(config, cost) -> dict:
    from cluster.estimate import NodeSpeed, check_probed_for
    missing = [n.name for n in config.nodes if n.speed is None]
    if missing:
        raise ValueError(f"no speed figures for {', '.join(missing)} in {config.source}: run `kimi-cluster probe "
                         "MODEL` on each of those machines and paste what it prints under the node")
    for node in config.nodes:
        check_probed_for(node.speed, cost, node.name)
    head = config.head_node
    return {n.name: NodeSpeed(n.address, n.speed, n.speed.cores, 0.0 if n is head else n.round_trip_ms, n.link_gbps)
            for n in config.nodes}


def _probe_progress(line: str) -> None:
    print(f"kimi-cluster probe: {line}", file=sys.stderr, flush=True)


def cmd_probe(args) -> None:
    from cluster.estimate import ModelCost
    from cluster.probe import probe_here, round_trip_ms
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import checked_config
    model_file = GGUFModelFile(args.model)
    link = {"round_trip_ms": float(f"{round_trip_ms(args.head):.3g}")} if args.head else {}
    speed = probe_here(ModelCost.from_model(model_file, checked_config(model_file)), fresh=True,
                       progress=_probe_progress)
    print(f"# measured by `kimi-cluster probe` on {platform.node()} ({speed.cores} cores); paste under this node in "
          "the cluster config,\n# with its link's bandwidth: link_gbps (GB/s; 10 GbE: 1.25)"
          + ("" if args.head else " and round_trip_ms (ping to the head, or probe with --head)"))
    print(yaml.safe_dump({**link, "speed": speed.to_dict()}, sort_keys=False, default_flow_style=None).rstrip())


def cmd_certs(args) -> None:
    from cluster.certs import CA_CERT, NODE_CERT, NODE_KEY, parse_nodes, write_certificates
    folder = Path(args.folder).expanduser()
    nodes = parse_nodes(args.nodes)
    written = write_certificates(folder, nodes)
    print(f"wrote {', '.join(p.name for p in written)} in {folder}")
    print(f"in the cluster config:\ntls:\n  ca: {folder / CA_CERT}\n  cert: {folder / NODE_CERT}\n"
          f"  key: {folder / NODE_KEY}")
    print(f"then copy {folder} to every node at the same path (ca-key.pem is only needed here, to add nodes later)")


def cmd_inspect(args) -> None:
    """Print what the file holds, once its header, tensors and tokenizer have been checked (no tensor data read)."""
    from cluster.placement import format_bytes
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import checked_config
    from runtime.tokenizer import Tokenizer
    model_file = GGUFModelFile(args.model)
    config = checked_config(model_file)
    tokenizer = Tokenizer.from_metadata(model_file.metadata)
    parts = f" and {len(model_file.paths) - 1} more parts" if len(model_file.paths) > 1 else ""
    print(f"file: {model_file.paths[0]}{parts}  ({format_bytes(model_file.file_bytes)})")
    print(f"architecture: {model_file.architecture}  name: {model_file.metadata.get('general.name', '?')}")
    print(f"layers: {config.num_layers} ({config.num_dense_layers} dense)  n_embd: {config.n_embd}  "
          f"heads: {config.num_heads}  q_lora: {config.q_lora_rank}  kv_lora: {config.kv_lora_rank}  "
          f"head dims qk/rope/v: {config.head_dim_qk}/{config.rope_dim}/{config.head_dim_v}  "
          f"attention: {'MLA (absorbed)' if config.is_mla else 'legacy kv_b'}")
    print(f"experts: {config.num_experts} routed, {config.num_experts_used} used, {config.num_shared_experts} "
          f"shared, n_ff {config.n_ff_expert}  gating: {'sigmoid' if config.gating_func == 2 else 'softmax'}  "
          f"scale: {config.expert_weights_scale:.4g}  groups: {config.num_expert_groups}")
    print(f"context: {config.context_length}  rope: {config.rope_scaling_type} x{config.rope_factor:g} "
          f"base {config.rope_base:g}  vocab: {config.vocab_size} tokens ({tokenizer.vocab_size} in the tokenizer, "
          f"pre-tokenizer {model_file.metadata.get('tokenizer.ggml.pre')}, "
          f"chat template {'yes' if tokenizer.chat_template else 'none'})")
    by_type: dict[str, list[int]] = {}
    for info in model_file.tensors.values():
        entry = by_type.setdefault(info.ggml_type.name, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    expert_bytes = model_file.routed_expert_bytes()
    other_bytes = sum(info.nbytes for info in model_file.tensors.values()) - expert_bytes
    print("tensor types:")
    for name, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:8s} {count:5d} tensors  {format_bytes(nbytes):>10s}")
    print(f"routed experts: {format_bytes(expert_bytes)}   everything else (head node): {format_bytes(other_bytes)}")
    print("checked: every tensor the model reads is present, with the shape the metadata implies and a type "
          "ggml computes; the tokenizer loads")


def cmd_make_model(args) -> None:
    from runtime.demo_model import make_model
    from runtime.replica_model import write_sparse_replica
    if args.sparse and args.preset != REPLICA_PRESET:
        raise ValueError(f"--sparse writes the {REPLICA_PRESET} preset only (the others are small and written with "
                         f"random weights): add --preset {REPLICA_PRESET}, or drop --sparse")
    if args.preset == REPLICA_PRESET and not args.sparse:
        raise ValueError(f"--preset {REPLICA_PRESET} is 340 GB: it is only written sparse (headers, with the tensor "
                         "data left as file holes); add --sparse")
    if args.sparse:
        if args.quant:
            raise ValueError(f"--quant does not apply to --preset {REPLICA_PRESET}: its types are Unsloth's "
                             "UD-Q2_K_XL recipe (see `kimi-cluster inspect` on the result)")
        paths = write_sparse_replica(args.out, seed=args.seed)
        apparent, on_disk = (sum(getattr(p.stat(), key) for p in paths) for key in ("st_size", "st_blocks"))
        print(f"wrote {paths[0]} and {len(paths) - 1} more parts: {apparent / 1e9:.1f} GB of tensors, zeros but "
              f"for the routers' biases, in {on_disk * 512 / 1e6:.1f} MB of disk")
        return
    path = make_model(args.out, preset=args.preset, quant=args.quant, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _print_access_line(line: str) -> None:
    print(f"kimi-cluster: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _serving(args, host: str, port: int, announce: bool = True):
    """Listen at once (GET /health says "loading"), bring the model up, then serve; yields the base URL.
    announce: say where it listens and log each request (off for the private server behind `chat MODEL`)."""
    from cluster.api import ApiServer, Service
    from runtime.engine import Engine
    from runtime.gguf_file import GGUFModelFile
    from runtime.tokenizer import Tokenizer
    config = _cluster_config(args)
    max_sequences = config.max_sequences if config is not None else args.max_sequences or DEFAULT_MAX_SEQUENCES
    if not 1 <= max_sequences < args.step_tokens:
        raise ValueError(f"--step-tokens ({args.step_tokens}) must exceed --max-sequences ({max_sequences}), "
                         "which must be at least 1: every running sequence takes a row of each step")
    api_key = _api_key(args, config)
    _check_exposure(host, api_key, args.no_auth)
    model_file = GGUFModelFile(args.model)
    context = _context(args, config)
    context = min(context, int(model_file.metadata.get("deepseek2.context_length", context)))
    service = Service(args.model_name or Path(args.model).name.split("-0000")[0].removesuffix(".gguf"),
                      Tokenizer.from_metadata(model_file.metadata), context, api_key=api_key,
                      protect_metrics=args.protect_metrics,
                      access_log=None if not announce or args.quiet else _print_access_line)
    server = ApiServer(service, host, port)
    url = f"http://{host}:{server.start()}"
    if announce:
        print(f"kimi-cluster: {url}/v1 answers for '{service.model_name}' once the model has loaded "
              f"({max_sequences} sequences at once, {context} tokens of context each, {args.step_tokens} token "
              f"rows per step, API key {'required' if service.api_key else 'not required'})", file=sys.stderr)
    else:
        print(f"loading {args.model} ...", file=sys.stderr)
    try:
        with _model_session(args, config, model_file, service.tokenizer) as (model, _, cluster):
            if cluster is not None:
                cluster.remote.observers.append(service.metrics.observe_experts)
                service.metrics.watch_failover(cluster.failover, cluster.placement.replica_count)
            engine = Engine(model, context, max_sequences=max_sequences, max_step_tokens=args.step_tokens)
            service.ready(engine, cluster.status if cluster is not None else dict)
            try:
                yield url
            finally:
                engine.stop()
    except Exception as e:
        service.load_error = str(e)
        raise
    finally:
        server.stop()


def _wait_for_ctrl_c() -> None:
    while True:
        time.sleep(3600)


def cmd_serve(args) -> None:
    with _serving(args, args.host, args.port) as url:
        print(f"kimi-cluster: ready at {url}/v1 (OpenAI API; also {url}/health and {url}/metrics); "
              "Ctrl-C stops", file=sys.stderr)
        _wait_for_ctrl_c()


def _chat_loop(url: str, args) -> None:
    """Read a line, stream the reply, keep the conversation; /reset forgets it, Ctrl-D ends. With --tools, a
    reply's tool calls are shown and each call's result is asked for, then the model goes on."""
    from cluster.client import ApiClientError
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "min_p": args.min_p, "seed": args.seed, "tools": _chat_tools(args.tools)}
    params = {k: v for k, v in params.items() if v is not None}
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/reset":
            del messages[int(bool(args.system)):]
            continue
        if not line.strip():
            continue
        asked = len(messages)
        messages.append({"role": "user", "content": line})
        try:
            while _chat_turn(url, messages, args.api_key, params):  # tool calls: their results, then on
                pass
        except ApiClientError as e:  # say so and keep the conversation as it was before this line
            print(f"\n[{e}]", file=sys.stderr)
            del messages[asked:]
        except EOFError:  # Ctrl-D while a tool result was asked for
            print()
            return


def _chat_turn(url: str, messages: list[dict], api_key: str | None, params: dict) -> bool:
    """Stream one reply into `messages`; when it calls tools, ask for each result and return True."""
    from cluster.client import stream_chat
    reply, calls = [], {}
    for choice in stream_chat(url, messages, api_key, **params):
        delta = choice.get("delta", {})
        if delta.get("reasoning_content"):
            print(f"\x1b[2m{delta['reasoning_content']}\x1b[0m", end="", flush=True)
        if delta.get("content"):
            reply.append(delta["content"])
            print(delta["content"], end="", flush=True)
        for piece in delta.get("tool_calls") or []:
            call = calls.setdefault(piece["index"], {"id": "", "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            call["id"] = piece.get("id") or call["id"]
            call["function"]["name"] = piece.get("function", {}).get("name") or call["function"]["name"]
            call["function"]["arguments"] += piece.get("function", {}).get("arguments") or ""
    print()
    messages.append({"role": "assistant", "content": "".join(reply) or None, **(
        {"tool_calls": list(calls.values())} if calls else {})})
    for call in calls.values():
        function = call["function"]
        print(f"[tool call {call['id']}: {function['name']}({function['arguments'].strip()})]")
        result = input(f"result of {function['name']}> ")
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return bool(calls)


def _chat_tools(path: str | None) -> list[dict] | None:
    """The tools of --tools: a JSON file with OpenAI's `tools` list."""
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--tools {path}: not a readable JSON file ({e}); give a file with OpenAI's tools list, "
                         '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]') from None
    if not isinstance(tools, list):
        raise ValueError(f"--tools {path}: the file holds a {type(tools).__name__}, not a list of tools")
    return tools


def cmd_chat(args) -> None:
    _sampling_params(args)
    if args.model is None:
        from cluster.client import wait_until_ready
        wait_until_ready(args.url, timeout_s=10)
        _chat_loop(args.url, args)
        return
    args.model_name, args.max_sequences, args.step_tokens = None, 4, 512
    with _serving(args, "127.0.0.1", 0, announce=False) as url:
        print("type a message and press Enter; /reset forgets the conversation, Ctrl-D quits", file=sys.stderr)
        _chat_loop(url, args)


def cmd_demo(args) -> None:
    from cluster.client import stream_chat
    from runtime.demo_model import make_model
    _sampling_params(args)
    path = Path(args.model)
    if not path.exists():
        print(f"writing the demo model to {path} ...", file=sys.stderr)
        make_model(path, preset="tiny")
    args.model = str(path)
    with _serving(args, args.host, args.port) as url:
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
        _wait_for_ctrl_c()


def _demo_speed(tokens: int, started: float, first_at: float | None, ended: float) -> str:
    """The first token (prompt processing and the first step) apart from the decode rate after it."""
    if first_at is None or tokens < 2:
        return f"{tokens} tokens in {ended - started:.2f} s"
    return (f"first token after {first_at - started:.2f} s, then {tokens - 1} tokens at "
            f"{(tokens - 1) / (ended - first_at):.1f} tokens/s")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability; 0 = off (default %(default)s)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalise repeated tokens; 1.0 = off (default %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="lower the logit of every token seen "
                                                                              "once; 0 = off (default %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="lower a token's logit per "
                                                                               "occurrence; 0 = off (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="random seed: same seed, same output")


def _add_runtime_args(p: argparse.ArgumentParser, serving: bool = False) -> None:
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--context", type=int, default=None,
                   help=f"context size in tokens (default: the cluster config's, else {DEFAULT_CONTEXT})")
    p.add_argument("--repack", choices=["none", "experts", "head", "all"], default=None if serving else "all",
                   help="copy weights into ggml's faster interleaved layout, as llama.cpp does on x86: "
                        "experts = the routed experts, head = all but the routed experts, all = both (needs "
                        "RAM for the whole model), none = read everything in place from the file. Default: " +
                        ("all, the fastest; experts with --deterministic" if serving else "all, the fastest"))
    if serving:
        p.add_argument("--deterministic", action="store_true",
                       help="a sequence gets exactly the tokens it would get alone, whatever shares its batch: "
                            "only the routed experts are interleaved (they run row by row), as interleaved "
                            "matmuls round rows in groups of four. Without it, batched and solo runs agree to "
                            "llama.cpp's own rounding, not bit for bit")


def _resolve_repack(parser: argparse.ArgumentParser, args) -> None:
    """--repack's serving default depends on --deterministic, which rules out the batch-dependent choices."""
    if not getattr(args, "deterministic", False):
        args.repack = args.repack or "all"
    elif args.repack in ("head", "all"):
        parser.error(f"--deterministic keeps the head's weights in place; it cannot be combined with "
                     f"--repack {args.repack} (use none or experts)")
    else:
        args.repack = args.repack or "experts"


def _add_server_args(p: argparse.ArgumentParser, port: bool = True) -> None:
    group = p.add_argument_group("server")
    if port:
        group.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; "
                                                               "0.0.0.0 for every interface)")
        group.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    group.add_argument("--api-key", default=os.environ.get("KIMI_API_KEY"),
                       help="require the key ('Authorization: Bearer KEY' or 'x-api-key: KEY') on every path "
                            "but /health and /metrics (default: $KIMI_API_KEY, else the cluster config's api_key, "
                            "else none; a --host other than loopback needs one, or --no-auth)")
    group.add_argument("--no-auth", action="store_true",
                       help="serve on a --host other than loopback without an API key, on purpose")
    group.add_argument("--protect-metrics", action="store_true",
                       help="ask for the API key on /health and /metrics too (default: they stay open, for "
                            "monitoring)")
    group.add_argument("--max-sequences", type=int, default=None,
                       help="sequences decoded together in one batch (default: the cluster config's, else "
                            f"{DEFAULT_MAX_SEQUENCES}); more wait in a queue")
    group.add_argument("--step-tokens", type=int, default=512,
                       help="most token rows in one step (default %(default)s): decoding sequences take one each, new "
                            "prompts are prefilled in chunks of what is left; lower it to keep decoding smooth "
                            "while long prompts arrive, raise it for faster prefill")
    group.add_argument("--model-name", default=None, help="the model id clients use (default: the file name)")
    group.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                       help="leave out the line printed per request (status, tokens, time to first token, "
                            "tokens/s) (default %(default)s)")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("cluster (default: everything in this process)")
    group.add_argument("--config", metavar="FILE", help="cluster config (YAML) for your Ray cluster; see "
                                                        "configs/cluster.example.yaml")
    group.add_argument("--workers", type=int, default=0, metavar="N",
                       help="start a local Ray with N expert worker processes on this machine, to try it out")
    group.add_argument("--worker-memory", type=float, default=None, metavar="GB",
                       help="with --workers: memory each worker may use (default: 80%% of RAM split evenly)")
    group.add_argument("--head-memory", type=float, default=None, metavar="GB",
                       help="with --workers: memory for the head's own weights and expert share")
    group.add_argument("--reserve-gb", type=float, default=0.5,
                       help="with --workers: GiB kept free per process on this machine, for Ray and Python "
                            "(default %(default)s; measured: Ray, the head and 2 workers take 0.75 GiB in all)")
    group.add_argument("--allow-disk", action="store_true", default=None,
                       help="when the pool's memory is short, place the rest of the experts anyway and page them "
                            "from the model file on each node's disk, slowly (default: the cluster config's "
                            "allow_disk, else refuse)")
    group.add_argument("--replicas", choices=("0", "1", "auto"), default=None,
                       help="second copies of workers' experts, so a lost worker costs no fallback to the head: "
                            "0 none, 1 every expert twice (refused if it does not fit), auto as many as the memory "
                            "left over holds (default: the cluster config's, else 0)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-cluster",
        description="Run Kimi K2.x GGUF models (the deepseek2 architecture) on one machine or across several. "
                    "Start with `kimi-cluster demo`.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate from a GGUF model (first file of a split set is enough).")
    p.add_argument("model", help="path to the .gguf file (or its -00001-of-0000N.gguf part)")
    p.add_argument("--prompt", required=True, help="the prompt text; special tokens like <|im_user|> are parsed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_tokens, tokens, text, tokens_per_s")
    p.add_argument("--logits-out", metavar="FILE.npy",
                   help="save the float32 logits of the last prompt position")
    _add_sampling_args(p)
    _add_runtime_args(p)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API",
                       description="Bring the model up (on this machine, or with its experts spread over a Ray "
                                   "cluster) and serve /v1/completions, /v1/chat/completions and /v1/models as "
                                   "OpenAI's API does, plus /health and /metrics (Prometheus). Requests share "
                                   "decode steps (continuous batching).")
    p.add_argument("model", help="path to the .gguf file (or its -00001-of-0000N.gguf part)")
    _add_server_args(p)
    _add_runtime_args(p, serving=True)
    _add_cluster_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat in the terminal, with a running server or a model file",
                       description="Interactive chat: streams each reply and keeps the conversation "
                                   "(/reset forgets it, Ctrl-D quits). Give a model path to load it here, or "
                                   "--url to talk to a running `kimi-cluster serve`.")
    p.add_argument("model", nargs="?", help="a .gguf to load in this process (default: use --url)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (default %(default)s)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--tools", metavar="FILE", default=None,
                   help="a JSON file with OpenAI's tools list: the model may call them; each call is shown and its "
                        "result is asked for")
    p.add_argument("--api-key", default=os.environ.get("KIMI_API_KEY"), help="the server's API key, if it has one")
    _add_sampling_args(p)
    _add_runtime_args(p, serving=True)
    _add_cluster_args(p)
    # A model loaded here is served on loopback only, to this chat.
    p.set_defaults(func=cmd_chat, max_tokens=512, no_auth=False, protect_metrics=False)

    p = sub.add_parser("plan", help="show how the experts would be spread over the machines",
                       description="Plan the placement of every routed expert by memory budget and print it "
                                   "(per node: experts per layer, GB, share of each layer), without loading "
                                   "anything. Exits 1 when the pool is too small.")
    p.add_argument("model", help="path to the .gguf file (or its first part)")
    p.add_argument("--context", type=int, default=None,
                   help="plan the head's KV cache for this many tokens per sequence (default: the config's)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="... and for this many sequences at once (default: the config's)")
    p.add_argument("--estimate", action="store_true",
                   help="also predict decode tokens/s (one stream and --streams) and prefill tokens/s from each "
                        "node's `speed` in the config (what `kimi-cluster probe` printed there); with --workers, "
                        "from this machine's probe (run now if not done before)")
    p.add_argument("--streams", type=_positive_int, default=16,
                   help="streams for the batched estimate (default %(default)s)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=512,
                   help="prompt length for the prefill estimate (default %(default)s)")
    p.add_argument("--decode-context", type=_positive_int, default=1024,
                   help="tokens of context the decode estimate assumes (default %(default)s)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("probe", help="measure this machine's speed for a model, for `plan --estimate` and "
                                     "placement by speed",
                       description="Measure how fast this machine streams and computes each weight type the "
                                   "model uses, how fast it computes routed experts of the model's shape, and "
                                   "the runtime's fixed costs (alone, and with one and two local workers: starts "
                                   "Ray twice). Prints the figures as YAML to paste under this node in the "
                                   "cluster config, where `plan --estimate` and the placement (shares by speed) "
                                   "use them, and keeps them for `plan --estimate --workers N` here. Takes about "
                                   "two minutes; run it on each machine, idle.")
    p.add_argument("model", help="path to the .gguf file (or its first part): only its header is read")
    p.add_argument("--head", metavar="HOST[:PORT]",
                   help="also measure this machine's round trip to the head (TCP handshakes to its Ray port, "
                        "6379, unless given), for round_trip_ms")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("inspect", help="show a model's metadata, tensor types and sizes")
    p.add_argument("model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("make-model", help="write a random model in the Kimi K2 GGUF layout, or a sparse replica "
                                          "of Kimi K2.6's 340 GB file set",
                       description="Write a random model with Kimi K2's layout and tokenizer, for tests and "
                                   "benchmarks; --quant uses llama.cpp's quantizer (needs llama-cpp-python). "
                                   f"--preset {REPLICA_PRESET} --sparse writes Kimi K2.6's real UD-Q2_K_XL file set "
                                   "(8 parts, real metadata, shapes and a 163,840-token vocabulary) with every "
                                   "tensor left as a file hole: 340 GB that read as zeros, in a few MB of disk.")
    p.add_argument("out", help="output .gguf path (for a split set, its parts are named <out>-0000N-of-00008.gguf)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "k2-depth", "k2-slice", REPLICA_PRESET],
                   help="tiny: 256 wide, for tests; small: 1024 wide, 32 experts; k2-depth: K2's 61 layers and "
                        "384 experts at tiny widths, for the framework's cost per layer; k2-slice: K2's real "
                        f"widths, 3 layers, 16 experts; {REPLICA_PRESET}: the real model's size, with --sparse "
                        "(default %(default)s)")
    p.add_argument("--sparse", action="store_true",
                   help="write headers only, tensor data as file holes (zeros); only with the replica preset")
    p.add_argument("--quant", default=None, help="quantize, e.g. Q8_0, Q4_K_M, Q2_K (default: unquantized)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default %(default)s)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("certs", help="make a private CA and a certificate per node, for TLS between the head "
                                     "and its expert workers",
                       description="Write a private certificate authority (once; later runs reuse it) and a "
                                   "certificate and key per node into FOLDER. Workers then accept only a head "
                                   "with a certificate from this CA, and the head only workers with one. Keys are "
                                   "readable by their owner only. Point the cluster config's `tls` at the folder "
                                   "(the command prints the lines) and copy the folder to every node, at the same "
                                   "path.")
    p.add_argument("folder", help="where to write ca.pem, ca-key.pem, NAME.pem and NAME-key.pem")
    p.add_argument("--nodes", required=True, metavar="NAME=ADDRESS,...",
                   help="every node, head included, by the name the cluster config's `nodes` give it and its "
                        "address (IP or host name), e.g. bigbox=192.168.1.10,worker-a=192.168.1.11")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("demo", help="serve the built-in demo model on 2 local expert workers and chat once",
                       description="Write the demo model if missing, start a local Ray cluster with 2 expert "
                                   "workers, serve it, send one chat completion through the API, print the reply "
                                   "and tokens/s, and keep serving until Ctrl-C (--once: exit after the reply).")
    p.add_argument("--model", default=str(DEMO_PATH), help="demo model path, written if missing (default %(default)s)")
    p.add_argument("--once", action="store_true", help="exit after the first reply")
    _add_server_args(p)
    _add_sampling_args(p)
    _add_runtime_args(p, serving=True)
    _add_cluster_args(p)
    # Quiet: an access line would land in the middle of the streamed reply it prints.
    p.set_defaults(func=cmd_demo, max_tokens=32, workers=2, model_name="kimi-demo", quiet=True)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, systemd, docker stop): shut down as cleanly as for Ctrl-C, then exit 0."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "repack"):
        _resolve_repack(parser, args)
    # ggml's OpenMP threads spin between ops instead of sleeping: ~25% faster per token. Must be set before
    # ggml loads. Servers, and heads whose expert workers share their cores (--workers), spin only briefly
    # (GOMP_SPINCOUNT) and then sleep: an idle server costs nothing, and a head waiting for its workers does
    # not starve them (measured with 2 local workers: prompt 30 -> 35 tokens/s, decode within 4%). The probe
    # (also run by `plan --estimate`) measures as servers run.
    os.environ.setdefault("OMP_WAIT_POLICY", "active")
    if args.command in ("serve", "chat", "demo", "probe", "plan") or getattr(args, "workers", 0):
        os.environ.setdefault("GOMP_SPINCOUNT", "300000")
    if args.command in ("serve", "chat", "demo"):
        signal.signal(signal.SIGTERM, _terminate)
    from runtime.gguf_file import GGUFError
    try:
        args.func(args)
    except (GGUFError, ValueError, RuntimeError, OSError) as e:
        # One line, even when it quotes a damaged file's strings.
        print(f"kimi-cluster: error: {CONTROL_CHARACTERS.sub(lambda m: repr(m[0])[1:-1], str(e))}", file=sys.stderr)
        return 2
    except Terminated:
        print("kimi-cluster: stopped (SIGTERM)", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
