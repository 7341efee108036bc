"""The options several commands share (sampling, runtime, server, cluster), and what they mean together:
the cluster settings, the context size, the API key, the sampling settings. Each is checked before anything
loads, and an error names the flag."""
from __future__ import annotations

import argparse
import dataclasses
import os

from runtime.speculative import AUTO_LOCAL, AUTO_REMOTE, parse_speculate

DEFAULT_MAX_SEQUENCES = 16


def cluster_config(args, missing_secret=None):
    """The cluster settings for --config FILE or --workers N (None for a single process). --context and
    --max-sequences, when given, win over the file's: the head's KV cache is planned for what will run.
    missing_secret: as in ClusterConfig.from_yaml."""
    from cluster.config import ClusterConfig
    if args.config:
        config = ClusterConfig.from_yaml(args.config, missing_secret)
    elif args.workers:
        config = ClusterConfig.from_dict({"model": args.model, "reserve_gb": args.reserve_gb}, "--workers")
    else:
        return None
    given = {"context": getattr(args, "context", None), "max_sequences": getattr(args, "max_sequences", None),
             "replicas": getattr(args, "replicas", None), "allow_disk": getattr(args, "allow_disk", None)}
    return dataclasses.replace(config, **{key: value for key, value in given.items() if value is not None})


def configured_api_key(args, config) -> str | None:
    """--api-key (or $KIMI_API_KEY), else the cluster config's api_key, else None (no key asked)."""
    return args.api_key or (config.api_key if config is not None else None)


def sampling_params(args):
    """The sampling flags, checked before anything loads; errors name the flag."""
    from runtime.sampling import SamplingParamError, SamplingParams
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty, seed=args.seed)
    except SamplingParamError as e:
        flag = "--repeat-penalty" if e.field == "repetition_penalty" else "--" + e.field.replace("_", "-")
        raise ValueError(f"{flag} must be {e.allowed}, got {e.value!r}") from None


def add_sampling_args(p: argparse.ArgumentParser) -> None:
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


def gpu_choice(text: str) -> str | int:
    """--gpu's value: auto, none, cpu, or a GPU's number."""
    if text in ("auto", "none", "cpu"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected auto, none, cpu or a GPU's number, not {text!r}")


def add_runtime_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, serving: bool = False) -> None:
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--gpu", type=gpu_choice, default="auto", metavar="auto|none|cpu|N",
                   help="put the head's weights (attention, norms, routers, shared experts, dense layers, output; "
                        "every token reads them all) on a GPU through ggml's CUDA, Metal or Vulkan backend, and run "
                        "the routed experts on the CPU, as llama.cpp's -ngl 99 -ot exps=CPU. auto: the first GPU "
                        "they fit on, if ggml was built with one (the start says which backends it has); N: GPU N, "
                        "or an error; none: the CPU only; cpu: the GPU's code path with the CPU standing in, for "
                        "testing (default %(default)s; none with --deterministic)")
    p.add_argument("--gpu-experts-gb", type=float, default=0.0, metavar="GiB",
                   help="with a GPU and every expert in this process: also copy routed experts onto the GPU, up to "
                        "this many GiB of them, the most often routed first (counted by earlier runs with workers; "
                        "else as many of each layer), which it then computes instead of the CPU (default %(default)s)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens each sequence holds, prompt and reply (default: the cluster config's, else the "
                        "largest the head's memory holds beside the model for every sequence at once, up to the "
                        "model's own length; `plan` shows it)")
    p.add_argument("--repack", choices=["none", "experts", "head", "all"], default=None if serving else "all",
                   help="copy weights into ggml's faster interleaved layout, as llama.cpp does on x86: "
                        "experts = the routed experts, head = all but the routed experts, all = both (needs "
                        "RAM for the whole model), none = read everything in place from the file. Default: " +
                        ("all, the fastest; experts with --deterministic" if serving else "all, the fastest"))
    p.add_argument("--speculate", type=speculate_choice, default="auto", metavar="auto|off|N",
                   help="draft tokens from the context (what the reply copies from its prompt or from earlier "
                        "replies) and check them in the same step, several tokens per step where they are right; "
                        "the output is the same. N: at most N drafted tokens per step; auto: up to "
                        f"{AUTO_LOCAL} in one process, {AUTO_REMOTE} with workers (whose round trips every row "
                        "shares); the length adapts to how often drafts are right (default %(default)s)")
    if serving:
        p.add_argument("--deterministic", action="store_true",
                       help="a sequence gets exactly the tokens it would get alone, whatever shares its batch: "
                            "only the routed experts are interleaved (they run row by row), as interleaved "
                            "matmuls round rows in groups of four. Without it, batched and solo runs agree to "
                            "llama.cpp's own rounding, not bit for bit")


def resolve_repack(parser: argparse.ArgumentParser, args) -> None:
    """--repack's serving default depends on --deterministic, which rules out the batch-dependent choices; so
    does --gpu's: a GPU's kernels round a row with the others of its batch."""
    if not getattr(args, "deterministic", False):
        args.repack = args.repack or "all"
        return
    if args.repack in ("head", "all"):
        parser.error(f"--deterministic keeps the head's weights in place; it cannot be combined with "
                     f"--repack {args.repack} (use none or experts)")
    if isinstance(args.gpu, int):
        parser.error(f"--deterministic computes every row as a step of its own would, which a GPU's kernels do not; "
                     f"it cannot be combined with --gpu {args.gpu} (use none)")
    args.repack = args.repack or "experts"
    args.gpu = "none" if args.gpu == "auto" else args.gpu


def add_server_args(p: argparse.ArgumentParser, port: bool = True) -> None:
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
    group.add_argument("--prompt-cache-gb", type=float, default=None, metavar="GiB",
                       help="memory for the KV of ended requests, kept so that a prompt that starts as an earlier "
                            "one did (an agent's next turn) computes only the rest (default: the head's KV memory "
                            "that the plan sets aside, less what the running sequences may hold at the time; 0 "
                            "turns prompt reuse off)")
    group.add_argument("--prompt-cache-dir", default=None, metavar="DIR",
                       help="also write the kept KV to files in DIR (a folder per model file), so that a restarted "
                            "server skips the prefill of prompts it has seen (default: memory only)")
    group.add_argument("--prompt-cache-disk-gb", type=float, default=50, metavar="GiB",
                       help="most disk the --prompt-cache-dir files take, least recently used out (default "
                            "%(default)s)")
    group.add_argument("--model-name", default=None, help="the model id the server reports (default: the file name)")
    group.add_argument("--strict-model-name", action="store_true",
                       help="refuse requests that name another model (default: any name means the served model, "
                            "as llama-server does: coding agents send names of their own, such as claude-sonnet-4-5)")
    group.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False,
                       help="leave out the line printed per request (status, tokens, time to first token, "
                            "tokens/s) (default %(default)s)")


def add_cluster_args(p: argparse.ArgumentParser, title: str = "cluster (default: everything in this process)") -> None:
    group = p.add_argument_group(title)
    group.add_argument("--config", metavar="FILE", help="cluster config (YAML) for your Ray cluster; see "
                                                        "configs/cluster.example.yaml")
    group.add_argument("--workers", type=int, default=0, metavar="N",
                       help="start a local Ray with N expert worker processes on this machine, to try it out")
    group.add_argument("--worker-memory", type=float, default=None, metavar="GiB",
                       help="with --workers: memory each worker may use (default: 80%% of RAM split evenly)")
    group.add_argument("--head-memory", type=float, default=None, metavar="GiB",
                       help="with --workers: memory for the head's own weights, KV cache and expert share")
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


def speculate_choice(text: str) -> str:
    """--speculate's value, checked (the number it stands for depends on where the experts run)."""
    try:
        parse_speculate(text, experts_remote=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--speculate takes ")) from None
    return text


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
