"""The command line as a new user meets it: --help states the defaults that are used, and mistakes (a
folder for a model, a port in use, a bad flag) are one clear line, not a traceback."""
from __future__ import annotations

import re
import socket

import pytest

from cluster import cli
from cluster.placement import GiB, Inventory
from runtime.config import ModelConfig
from runtime.gguf_file import GGUFModelFile

REQUIRED = {"generate": ["m.gguf", "--prompt", "hi"], "serve": ["m.gguf"], "chat": [], "plan": ["m.gguf"],
            "inspect": ["m.gguf"], "make-model": ["out.gguf"], "demo": [], "probe": ["m.gguf"]}


def subcommands():
    return cli.build_parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_help_states_the_default_that_is_used(command):
    parser = subcommands()[command]
    used = vars(cli.build_parser().parse_args([command, *REQUIRED[command]]))
    stated = 0
    for action in parser._actions:
        if not action.help:
            continue
        text = parser._get_formatter()._expand_help(action)
        for value in re.findall(r"\(default ([^\s:;,)]+)[;,)]", text):
            assert value == str(used[action.dest]), f"{command} {action.option_strings}: help says {value}"
            stated += 1
    assert stated >= (3 if command in ("serve", "demo", "generate", "chat") else 0)


def test_chat_and_demo_state_their_own_max_tokens():
    for command, tokens in (("chat", 512), ("demo", 32), ("generate", 128)):
        assert f"tokens to generate (default {tokens})" in " ".join(subcommands()[command].format_help().split())


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_a_folder_for_a_model_says_it_is_a_folder_and_names_the_files_in_it(tmp_path, capsys):
    (tmp_path / "UD-Q2_K_XL").mkdir()
    for part in (1, 2):
        (tmp_path / "UD-Q2_K_XL" / f"Kimi-K2.6-UD-Q2_K_XL-0000{part}-of-00002.gguf").write_bytes(b"GGUF")
    for command in (["inspect", str(tmp_path)], ["generate", str(tmp_path), "--prompt", "hi"]):
        code, err = run(capsys, *command)
        assert code == 2 and "is a directory" in err and "no such file" not in err
        assert "UD-Q2_K_XL/Kimi-K2.6-UD-Q2_K_XL-00001-of-00002.gguf" in err and "00002-of" not in err
        assert len(err.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line_before_anything_loads(tiny_f32, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(capsys, "serve", str(tiny_f32), "--port", str(port))
    assert code == 2
    assert err.strip().splitlines() == [f"kimi-cluster: error: port {port} on 127.0.0.1 is already in use (another "
                                        "server?); stop that program or choose another port with --port"]


@pytest.mark.parametrize("flag, value, words", [
    ("--temperature", "-1", "--temperature must be a finite number >= 0"),
    ("--top-p", "0", "--top-p must be a number in (0, 1]"),
    ("--repeat-penalty", "0", "--repeat-penalty must be a finite number > 0"),
])
def test_a_bad_sampling_flag_names_the_flag_before_loading(tiny_f32, capsys, flag, value, words):
    code, err = run(capsys, "generate", str(tiny_f32), "--prompt", "hi", flag, value)
    assert code == 2 and words in err and "SamplingParams" not in err
    assert "loading" not in err


@pytest.mark.parametrize("flags, repack", [([], "all"), (["--deterministic"], "experts"),
                                           (["--deterministic", "--repack", "none"], "none"),
                                           (["--repack", "head"], "head")])
def test_serve_runs_the_fastest_kernels_unless_asked_to_be_deterministic(flags, repack):
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "m.gguf", *flags])
    cli._resolve_repack(parser, args)
    assert args.repack == repack


def test_deterministic_refuses_an_interleaved_head(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "m.gguf", "--deterministic", "--repack", "all"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--deterministic" in err and "--repack all" in err


def test_plan_shows_replicas_and_refuses_ones_that_do_not_fit(make_tiny, capsys):
    path = str(make_tiny("Q4_K_M"))
    assert cli.main(["plan", path, "--workers", "2", "--replicas", "1"]) in (0, None)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("node"))
    assert "replicas" in header and "second copies of workers' experts" in out
    # Every node gets room for its own third of the experts and a little more: not for a copy of every expert.
    model_file = GGUFModelFile(path)
    inventory = Inventory.from_model(model_file, ModelConfig.from_metadata(model_file.metadata), cli.DEFAULT_CONTEXT,
                                     cli.DEFAULT_MAX_SEQUENCES)
    share_gb = 1.2 * inventory.total_expert_bytes / 3 / GiB
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", path, "--workers", "2", "--replicas", "1", "--reserve-gb", "0", "--worker-memory",
                  str(share_gb), "--head-memory", str(share_gb + inventory.head_bytes / GiB)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "replicas: 1" in out and "replicas: auto" in out
