"""The kimi-cluster command line: the parser over every command's module, and how a command ends (an error in
one line, Ctrl-C, SIGTERM).

One module per group of subcommands (generate, serve and demo, chat, cluster setup, model files), each adding
its own parsers; the options they share live in options.py. Modules below the command line are imported
when a command runs, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import signal
import sys

from cluster.cli import chat, cluster_setup, generate, model_files, serve
from cluster.cli.options import resolve_repack

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# In the order `kimi-cluster --help` lists the commands.
COMMAND_PARSERS = (generate.add_generate_parser, serve.add_serve_parser, chat.add_chat_parser,
                   cluster_setup.add_plan_parser, cluster_setup.add_probe_parser, model_files.add_inspect_parser,
                   model_files.add_make_model_parser, cluster_setup.add_certs_parser, serve.add_demo_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-cluster",
        description="Run Kimi K2.x GGUF models (the deepseek2 architecture) on one machine or across several. "
                    "Start with `kimi-cluster demo`.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('kimi-cluster')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMAND_PARSERS:
        add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, systemd, docker stop): shut down as cleanly as for Ctrl-C, then exit 0."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "repack"):
        resolve_repack(parser, args)
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
    except (GGUFError, ValueError, RuntimeError, OSError, MemoryError) as e:  # MemoryError: a device's, or ggml's
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
