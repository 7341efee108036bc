"""`kimi-cluster chat`: a conversation in the terminal, with a running server or a model loaded here."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cluster.cli.options import add_cluster_args, add_runtime_args, add_sampling_args, sampling_params
from cluster.cli.serve import serving


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal, with a running server or a model file",
                       description="Interactive chat: streams each reply and keeps the conversation "
                                   "(/reset forgets it, Ctrl-D quits). Give a model path to load it here, or "
                                   "--url to talk to a running `kimi-cluster serve`.")
    p.add_argument("model", nargs="?", help="a .gguf to load in this process (default: use --url)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--tools", metavar="FILE", default=None,
                   help="a JSON file with OpenAI's tools list: the model may call them; each call is shown and its "
                        "result is asked for")
    add_sampling_args(p)
    server = p.add_argument_group("a running server (without MODEL)")
    server.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("KIMI_API_KEY"),
                        help="the server's API key, if it has one (default: $KIMI_API_KEY)")
    add_runtime_args(p.add_argument_group("a model loaded here (with MODEL)"), serving=True)
    add_cluster_args(p, "cluster, for a model loaded here (default: everything in this process)")
    # A model loaded here is served on loopback only, to this chat.
    p.set_defaults(func=cmd_chat, max_tokens=512, no_auth=False, protect_metrics=False, strict_model_name=False)


def cmd_chat(args) -> None:
    sampling_params(args)
    if args.model is None:
        from cluster.cli.api_client import wait_until_ready
        wait_until_ready(args.url, timeout_s=10)
        _chat_loop(args.url, args)
        return
    # The private server's settings; its prompt cache lets each turn compute only what the last one added.
    args.model_name, args.max_sequences, args.step_tokens = None, 4, 512
    args.prompt_cache_gb, args.prompt_cache_dir = None, None
    with serving(args, "127.0.0.1", 0, announce=False) as url:
        print("type a message and press Enter; /reset forgets the conversation, Ctrl-D quits", file=sys.stderr)
        _chat_loop(url, args)


def _chat_loop(url: str, args) -> None:
    """Read a line, stream the reply, keep the conversation; /reset forgets it, Ctrl-D ends. With --tools, a
    reply's tool calls are shown and each call's result is asked for, then the model goes on."""
    from cluster.cli.api_client import ApiClientError
    messages = [{"role": "system", "content": args.system}] if args.system else []
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repeat_penalty,
              "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
              "seed": args.seed, "tools": _chat_tools(args.tools)}
    params = {k: v for k, v in params.items() if v is not None}
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/reset":
            del messages[int(bool(args.system)):]
            print("[conversation cleared" + (", the system message kept]" if args.system else "]"), file=sys.stderr)
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
    from cluster.cli.api_client import stream_chat
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
