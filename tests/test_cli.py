"""The command line as a new user meets it: --help states the defaults that are used, and mistakes (a
folder for a model, a port in use, a bad flag) are one clear line, not a traceback."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
import yaml

from cluster.cli.main import build_parser, main
from cluster.cli.options import DEFAULT_MAX_SEQUENCES, resolve_repack
from cluster.context_plan import LEAST_CONTEXT
from cluster.cost_model.estimate import MachineSpeed, ModelCost, model_types
from cluster.cost_model.probe import round_trip_ms
from cluster.placement import GiB, Inventory
from runtime.config import ModelConfig
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.tokenizer import Tokenizer
from tests.recording_proxy import RecordingProxy
from tests.test_api import KEY, start_server, stop_server

REQUIRED = {"generate": ["m.gguf", "--prompt", "hi"], "serve": ["m.gguf"], "chat": [], "plan": ["m.gguf"],
            "inspect": ["m.gguf"], "make-model": ["out.gguf"], "demo": [], "probe": ["m.gguf"]}


def subcommands():
    return build_parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_help_states_the_default_that_is_used(command):
    parser = subcommands()[command]
    used = vars(build_parser().parse_args([command, *REQUIRED[command]]))
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
    code = main(list(argv))
    return code, capsys.readouterr().err


def cli(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=300,
                          **options)


def test_version_and_what_inspect_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"kimi-cluster \d+\.\d+\.\d+\n", capsys.readouterr().out)
    described = " ".join(subcommands()["inspect"].format_help().split())
    assert "Check a GGUF model and show what it holds" in described and "Reads the header only" in described


def test_make_model_inspect_and_plan_give_sizes_in_the_same_unit(tmp_path):
    """The replica of Kimi K2.6: make-model's size is the one inspect reads, and plan's experts and head weights
    are inspect's routed experts and the rest, each in GiB."""
    made = cli("make-model", str(tmp_path / "k2.6.gguf"), "--preset", "k2.6-replica", "--sparse")
    written = re.search(r"more parts: ([\d.]+ GiB) of tensors, .* in [\d.]+ MiB of disk", made.stdout)
    first = str(tmp_path / "k2.6-00001-of-00008.gguf")
    inspected = cli("inspect", first).stdout
    assert written and f"and 7 more parts  ({written[1]})" in inspected, made.stdout + made.stderr
    experts, rest = re.search(r"routed experts: ([\d.]+ GiB) +everything else \(head node\): ([\d.]+ GiB)",
                              inspected).groups()
    planned = cli("plan", first, "--workers", "3", "--worker-memory", "128", "--head-memory", "128").stdout
    assert re.search(rf"\ntotal +\S+ +{experts} +{rest} +[\d.]+ GiB", planned), planned


def test_plan_shows_the_heads_weights_and_kv_cache_when_it_fits(tiny_q4km, capsys):
    assert main(["plan", str(tiny_q4km)]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("2 MoE layers over 1 node, shared by usable memory\n"), out
    kv_cache = re.search(r"([\d.]+ [KMG]iB) of KV cache on the head", out)[1]
    head_row = next(line for line in out.splitlines() if line.startswith("head (head)"))
    assert re.match(rf"head \(head\) +16 +[\d.]+ MiB +[\d.]+ MiB +{kv_cache} ", head_row), out


def test_generate_json_counts_tokens_and_times_decoding_after_the_first(tiny_q4km):
    out = json.loads(cli("generate", str(tiny_q4km), "--prompt", "hello there", "--max-tokens", "6", "--json",
                         "--threads", "1").stdout)
    assert out["prompt_tokens"] == len(out["prompt_token_ids"]) > 1
    assert out["completion_tokens"] == len(out["tokens"]) == 6
    assert out["time_to_first_token_s"] > 0 and out["tokens_per_s"] > 0
    one = json.loads(cli("generate", str(tiny_q4km), "--prompt", "hello there", "--max-tokens", "1", "--json",
                         "--threads", "1").stdout)
    assert one["completion_tokens"] == 1 and one["time_to_first_token_s"] > 0
    assert one["tokens_per_s"] == 0, "one token is all prefill: no decoding to time"


def test_chat_help_puts_a_local_models_options_apart_from_the_servers():
    groups = {group.title: {option for action in group._group_actions for option in action.option_strings}
              for group in subcommands()["chat"]._action_groups}
    assert groups["a running server (without MODEL)"] == {"--url", "--api-key"}
    assert groups["a model loaded here (with MODEL)"] == {"--threads", "--gpu", "--gpu-experts-gb", "--context",
                                                          "--repack", "--speculate", "--deterministic"}
    assert "--workers" in groups["cluster, for a model loaded here (default: everything in this process)"]
    assert "--temperature" in groups["options"] and "--url" not in groups["options"]


def test_chat_reset_says_so_and_sends_only_what_follows(make_tiny):
    """Against the real server behind a proxy that records each request: /reset is confirmed and the next
    request holds the system message and the new line only; the sampling flags all reach the server."""
    model_file = GGUFModelFile(make_tiny("Q4_K_M"))
    model = KimiModel(model_file, GgmlRunner(2), repack="none")
    server = start_server(model, Tokenizer.from_metadata(model_file.metadata))
    try:
        with RecordingProxy(server.url) as proxy:
            session = cli("chat", "--url", proxy.url, "--api-key", KEY, "--system", "be brief",
                          "--repeat-penalty", "1.1", "--presence-penalty", "0.5", "--frequency-penalty", "0.25",
                          input="hello\n/reset\nagain\n")
    finally:
        stop_server(server)
    assert session.returncode == 0, session.stderr
    assert "[conversation cleared, the system message kept]" in session.stderr
    requests = [exchange.body for exchange in proxy.posts("/v1/chat/completions")]
    assert all(exchange.status == 200 for exchange in proxy.posts("/v1/chat/completions"))
    system = {"role": "system", "content": "be brief"}
    assert [r["messages"] for r in requests] == [[system, {"role": "user", "content": "hello"}],
                                                 [system, {"role": "user", "content": "again"}]]
    assert {key: requests[0][key] for key in ("repetition_penalty", "presence_penalty", "frequency_penalty")} == {
        "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25}


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


@pytest.mark.parametrize("flags, repack, gpu", [([], "all", "auto"), (["--deterministic"], "experts", "none"),
                                                (["--deterministic", "--repack", "none"], "none", "none"),
                                                (["--deterministic", "--gpu", "cpu"], "experts", "cpu"),
                                                (["--repack", "head"], "head", "auto")])
def test_serve_runs_the_fastest_kernels_unless_asked_to_be_deterministic(flags, repack, gpu):
    parser = build_parser()
    args = parser.parse_args(["serve", "m.gguf", *flags])
    resolve_repack(parser, args)
    assert (args.repack, args.gpu) == (repack, gpu)


@pytest.mark.parametrize("flags, named", [(["--repack", "all"], "--repack all"), (["--gpu", "0"], "--gpu 0")])
def test_deterministic_refuses_an_interleaved_head_and_a_gpu(capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "m.gguf", "--deterministic", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--deterministic" in err and named in err


def test_plan_shows_replicas_and_refuses_ones_that_do_not_fit(make_tiny, capsys):
    path = str(make_tiny("Q4_K_M"))
    assert main(["plan", path, "--workers", "2", "--replicas", "1"]) in (0, None)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("node"))
    assert "replicas" in header and "second copies of workers' experts" in out
    # Every node gets room for its own third of the experts and a little more: not for a copy of every expert.
    model_file = GGUFModelFile(path)
    inventory = Inventory.from_model(model_file, ModelConfig.from_metadata(model_file.metadata), LEAST_CONTEXT,
                                     DEFAULT_MAX_SEQUENCES)
    share_gb = 1.2 * inventory.total_expert_bytes / 3 / GiB
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", path, "--workers", "2", "--replicas", "1", "--reserve-gb", "0", "--worker-memory",
                  str(share_gb), "--head-memory", str(share_gb + inventory.head_bytes / GiB)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "replicas: 1" in out and "replicas: auto" in out


def probed(cost: ModelCost, gbps: float) -> dict:
    """Figures as `kimi-cluster probe` prints them, for a machine that reads every type at `gbps` GB/s."""
    types = model_types(cost)
    return MachineSpeed({t: gbps for t in types}, {t: gbps / 2 for t in types}, {t: 4 * gbps for t in types},
                        {1: gbps, 4: 2 * gbps, 64: 4 * gbps}, cost.expert_shape,
                        {"decode": gbps, "prompt": 4 * gbps}, cost.attention_shape, 0.2, 50.0, 0.1, 1.0, 40.0, 0.5,
                        8).to_dict()


def test_plan_shares_layers_by_probed_speed_and_estimates_from_the_config(make_tiny, tmp_path, capsys):
    path = make_tiny("Q4_K_M")
    model_file = GGUFModelFile(path)
    cost = ModelCost.from_model(model_file, ModelConfig.from_metadata(model_file.metadata))
    nodes = [{"name": "atlas", "address": "10.0.0.1", "memory_gb": 8, "head": True, "speed": probed(cost, 10)},
             {"name": "borealis", "address": "10.0.0.2", "memory_gb": 8, "speed": probed(cost, 30),
              "round_trip_ms": 0.3, "link_gbps": 1.25}]
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"model": str(path), "reserve_gb": 0, "nodes": nodes}))

    assert main(["plan", str(path), "--config", str(config), "--estimate", "--streams", "4"]) in (0, None)
    out = capsys.readouterr().out
    assert "shared by each node's measured expert speed, memory allowing" in out
    per_layer = {line.split()[0]: int(line.split()[2 if "(head)" in line else 1].split("-")[0])
                 for line in out.splitlines() if line.startswith(("atlas", "borealis"))}
    assert per_layer["borealis"] == 3 * per_layer["atlas"], "3x the speed, 3x the experts of each layer"
    assert re.search(r"estimated decode at 1024 tokens of context: [\d.]+ tokens/s for one stream, [\d.]+ tokens/s "
                     r"over 4 streams; prefill of a 512-token prompt: [\d.]+ tokens/s", out)
    assert "bottleneck: " in out and "worker overhead" in out

    nodes[1]["speed"]["expert_shape"] = "gate Q2_K 7168x2048, up Q2_K 7168x2048, down Q2_K 2048x7168"
    config.write_text(yaml.safe_dump({"model": str(path), "reserve_gb": 0, "nodes": nodes}))
    assert main(["plan", str(path), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'borealis' were probed for another model" in err and "kimi-cluster probe MODEL" in err


def test_probe_measures_the_round_trip_to_the_head():
    with socket.create_server(("127.0.0.1", 0)) as head:
        port = head.getsockname()[1]
        assert 0 < round_trip_ms(f"127.0.0.1:{port}") < 50
    assert 0 < round_trip_ms(f"127.0.0.1:{port}") < 50, "a refused handshake is a round trip too"
    with pytest.raises(ValueError, match="--head no-such-host.invalid: not an address"):
        round_trip_ms("no-such-host.invalid")
