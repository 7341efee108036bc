"""ClusterConfig from YAML (the example loads, defaults apply, mistakes are refused naming key and file), and
the command-line settings that go with it."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from cluster.cli.main import build_parser, main
from cluster.cli.model_session import repack_that_fits
from cluster.cli.options import cluster_config, configured_api_key
from cluster.config import TLS_KEYS, TOP_LEVEL_KEYS, ClusterConfig, ClusterConfigError, NodeConfig
from cluster.head import ExpertCluster
from cluster.placement import GiB, NodeBudget
from cluster.security.certs import parse_nodes, write_certificates

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "cluster.example.yaml"
TOKEN = "0123456789abcdef0123456789abcdef"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_example_loads(tmp_path, monkeypatch):
    # The example names a token file next to it, and certificates in ~/kimi-certs: give the copy both.
    example = Path(shutil.copy(EXAMPLE, tmp_path / "cluster.yaml"))
    (tmp_path / "kimi-token.txt").write_text(TOKEN + "\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    write_certificates(tmp_path / "kimi-certs",
                       parse_nodes("bigbox=192.168.1.10,worker-a=192.168.1.11,worker-b=192.168.1.12"))
    config = ClusterConfig.from_yaml(example)
    assert config.tls.for_node("worker-a")["key"] == str(tmp_path / "kimi-certs" / "worker-a-key.pem")

    assert config.model.name == "Kimi-K2.6-UD-Q2_K_XL-00001-of-00008.gguf"
    assert config.token == TOKEN
    assert [n.name for n in config.nodes] == ["bigbox", "worker-a", "worker-b"]
    assert config.nodes[0] == NodeConfig("bigbox", "192.168.1.10", 256.0, is_head=True)
    assert config.node_budgets() == [NodeBudget("bigbox", 256 * GiB, True), NodeBudget("worker-a", 128 * GiB),
                                     NodeBudget("worker-b", 128 * GiB)]
    # The README downloads the model onto the head only: the workers get their experts from it.
    assert config.model_path_for("bigbox") == config.model
    assert config.model_path_for("worker-a") is config.model_path_for("worker-b") is None
    assert config.reserve_bytes == 4 * GiB
    assert config.source == str(example)


def test_example_documents_every_key():
    text = EXAMPLE.read_text()
    keys = yaml.safe_load(text).keys() | {line.split(":")[0].lstrip("# ") for line in text.splitlines()
                                          if line.startswith("#   ")}
    assert set(TOP_LEVEL_KEYS) - {"token"} <= keys  # token and token_file are alternatives
    assert set(TLS_KEYS) <= yaml.safe_load(text)["tls"].keys()


@pytest.mark.parametrize("written, meant", [(0, "0"), (1, "1"), ("auto", "auto"), ("1", "1")])
def test_replicas_are_none_every_expert_or_what_fits(written, meant):
    assert ClusterConfig.from_dict({"model": "m.gguf", "replicas": written}).replicas == meant


def test_defaults(tmp_path):
    config = ClusterConfig.from_yaml(write(tmp_path, {"model": "/models/k2.gguf"}))
    assert config == ClusterConfig(model=Path("/models/k2.gguf"), source=str(tmp_path / "cluster.yaml"))
    assert (config.ray_address, config.nodes, config.model_paths) == (None, (), {})
    assert (config.reserve_gb, config.port, config.wire_dtype, config.allow_disk) == (4.0, 50551, "f32", False)
    assert (config.context, config.max_sequences, config.threads, config.deadline_s) == (None, 16, None, 3.0)
    assert (config.token, config.tls, config.api_key, config.replicas) == (None, None, None, "0")
    assert config.node_budgets() == []
    # A key written but left empty in YAML is null: empty lists mean the same as leaving them out.
    blank = ClusterConfig.from_dict({"model": "/models/k2.gguf", "nodes": None, "model_paths": None})
    assert (blank.nodes, blank.model_paths) == ((), {})


@pytest.mark.parametrize("data, expected", [
    ({"model": "m.gguf", "modle_paths": {}}, r"unknown key 'modle_paths' \(top level\); allowed keys: ray_address"),
    ({"model": "m.gguf", "nodes": [{"name": "a", "address": "a", "memory_gb": 64},
                                   {"name": "b", "address": "b", "memory_gb": 64, "gpus": 1}]},
     r"unknown key 'gpus' \(nodes\[1\]\); allowed keys: name, address, memory_gb, head"),
    ({"model": "m.gguf", "nodes": [{"name": "a", "address": "a", "memory_gb": 64, "gpu": "cuda"}]},
     r"'gpu' in nodes\[0\] must be auto, cpu or a GPU's number, not 'cuda'"),
])
def test_unknown_keys_are_refused_naming_key_and_file(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(ClusterConfigError, match=expected) as error:
        ClusterConfig.from_yaml(path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize("extra, expected", [
    ({"port": "50551"}, r"'port' must be an integer, not str \('50551'\)"),
    ({"allow_disk": "yes"}, r"'allow_disk' must be true or false, not str"),
    ({"context": 4096.5}, r"'context' must be an integer, not float"),
    ({"context": None}, r"'context' must be an integer, not null"),
    ({"threads": True}, r"'threads' must be an integer or null, not bool"),
    ({"nodes": {"name": "a"}}, r"'nodes' must be a list or null, not dict"),
    ({"nodes": [{"name": "a", "address": "a", "memory_gb": "lots"}]}, r"'memory_gb' in nodes\[0\] must be a number"),
    ({"port": 70000}, r"'port' must be at most 65535, not 70000"),
    ({"deadline_s": 0}, r"'deadline_s' must be more than 0, not 0.0"),
    ({"wire_dtype": "f8"}, r"'wire_dtype' must be one of f32, f16, bf16, not 'f8'"),
    ({"replicas": 2}, r"'replicas' must be 0 \(none\), 1 \(every worker's expert twice\) or auto .*not 2"),
    ({"replicas": True}, r"'replicas' must be 0 .*not True"),
    ({"token": "short"}, r"'token' has 5 characters; use at least 16"),
    ({"nodes": [{"name": "a", "memory_gb": 64}]}, r"missing required key 'address' in nodes\[0\]"),
    ({"nodes": [{"name": "a", "address": "x", "memory_gb": 64}, {"name": "a", "address": "y", "memory_gb": 64}]},
     "repeated: a"),
    ({"nodes": [{"name": "a", "address": "x", "memory_gb": 64, "head": True},
                {"name": "b", "address": "y", "memory_gb": 64, "head": True}]}, "only one node can have 'head: true'"),
    ({"nodes": [{"name": "a", "address": "x", "memory_gb": 64}], "model_paths": {"b": None}},
     r"'model_paths' names node 'b', which is not in 'nodes' \(a\)"),
    ({"token": TOKEN, "token_file": "t.txt"}, "give 'token' or 'token_file', not both"),
])
def test_wrong_types_and_values_are_refused(tmp_path, extra, expected):
    path = write(tmp_path, {"model": "m.gguf", **extra})
    with pytest.raises(ClusterConfigError, match=expected) as error:
        ClusterConfig.from_yaml(path)
    assert str(error.value).startswith(f"{path}: ")


def test_without_model_every_node_reads_the_commands_model(tmp_path, make_tiny):
    node = {"name": "a", "address": "10.0.0.1", "memory_gb": 64}
    config = ClusterConfig.from_yaml(write(tmp_path, {"nodes": [node]}))
    assert config.model is None
    assert ExpertCluster(make_tiny("Q8_0"), config, progress=False).config.model_path_for("a") == make_tiny("Q8_0")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ClusterConfigError, match="empty"):
        ClusterConfig.from_yaml(empty)
    with pytest.raises(ClusterConfigError, match="no such file"):
        ClusterConfig.from_yaml(tmp_path / "absent.yaml")


def test_token_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(f"  {TOKEN}\n")
    config = ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "token_file": "secrets/token"}))
    assert config.token == TOKEN



def test_a_missing_token_file_error_says_how_to_create_it_and_that_works(tmp_path):
    config_path = write(tmp_path, {"model": "m.gguf", "token_file": "secrets/new-token"})
    (tmp_path / "secrets").mkdir()
    with pytest.raises(ClusterConfigError, match="does not exist; create it with") as error:
        ClusterConfig.from_yaml(config_path)
    command = re.search(r"`([^`]+)`", str(error.value))[1]
    subprocess.run(["bash", "-c", command], check=True)
    assert len(ClusterConfig.from_yaml(config_path).token) == 64
    assert (tmp_path / "secrets" / "new-token").stat().st_mode & 0o777 == 0o600


def test_tls_files_must_exist(tmp_path):
    for name in ("node.pem", "node-key.pem"):
        (tmp_path / name).write_text("PEM")
    tls = {"cert": "node.pem", "key": "node-key.pem", "ca": "ca.pem"}
    with pytest.raises(ClusterConfigError, match=r"tls files missing: ca .*ca.pem"):
        ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "tls": tls}))

    (tmp_path / "ca.pem").write_text("PEM")
    config = ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "tls": tls}))
    assert config.tls.ca == tmp_path / "ca.pem"

    with pytest.raises(ClusterConfigError, match=r"unknown key 'password' \('tls'\)"):
        ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "tls": {**tls, "password": "x"}}))
    with pytest.raises(ClusterConfigError, match=r"missing required key 'ca' in 'tls'"):
        ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf",
                                                 "tls": {"cert": "node.pem", "key": "node-key.pem"}}))


def certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "certs", *args], capture_output=True, text=True)


def test_certs_writes_what_the_per_node_tls_config_needs(tmp_path, monkeypatch):
    """`kimi-cluster certs` prints the config's tls lines in the ~ form every node reads in its own home; with
    {node} in them, every listed node's files are checked; a later run for a new node reuses the CA."""
    monkeypatch.setenv("HOME", str(tmp_path))
    nodes = [{"name": "big", "address": "10.0.0.1", "memory_gb": 8, "head": True},
             {"name": "small", "address": "10.0.0.2", "memory_gb": 8}]
    result = certs(str(tmp_path / "certs"), "--nodes", "big=10.0.0.1")
    tls = yaml.safe_load(result.stdout[result.stdout.index("tls:"):].split("\nthen")[0])["tls"]
    assert tls == {"ca": "~/certs/ca.pem", "cert": "~/certs/{node}.pem", "key": "~/certs/{node}-key.pem"}
    with pytest.raises(ClusterConfigError, match=r"tls files missing: cert .*certs/small.pem, key .*small-key.pem; "
                                                 r"make the certificates with `kimi-cluster certs"):
        ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "nodes": nodes, "tls": tls}))
    ca = (tmp_path / "certs" / "ca.pem").read_bytes()
    certs(str(tmp_path / "certs"), "--nodes", "small=10.0.0.2").check_returncode()
    config = ClusterConfig.from_yaml(write(tmp_path, {"model": "m.gguf", "nodes": nodes, "tls": tls}))
    assert (tmp_path / "certs" / "ca.pem").read_bytes() == ca
    small = x509.load_pem_x509_certificate(Path(config.tls.for_node("small")["cert"]).read_bytes())
    small.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    names = small.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["small"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    bad = certs(str(tmp_path / "x"), "--nodes", "a/b=1")
    assert bad.returncode != 0 and "node name 'a/b'" in bad.stderr and "Traceback" not in bad.stderr


def test_the_cas_key_stays_out_of_the_folder_the_nodes_get(tmp_path):
    """The folder copied to every node holds the CA's certificate and the nodes' files, never the CA's key, which
    waits beside it for the next node; a folder from before, with the key inside, has it moved out."""
    folder = tmp_path / "certs"
    result = certs(str(folder), "--nodes", "big=10.0.0.1")
    assert sorted(p.name for p in folder.iterdir()) == ["big-key.pem", "big.pem", "ca.pem"]
    ca_key = tmp_path / "certs-ca" / "ca-key.pem"
    assert ca_key.stat().st_mode & 0o777 == 0o600 and (tmp_path / "certs-ca").stat().st_mode & 0o777 == 0o700
    assert f"The CA's key is in {tmp_path / 'certs-ca'}" in result.stdout
    ca = (folder / "ca.pem").read_bytes()

    ca_key.rename(folder / "ca-key.pem")  # the layout of earlier versions
    result = certs(str(folder), "--nodes", "small=10.0.0.2")
    assert not (folder / "ca-key.pem").exists() and ca_key.exists() and (folder / "ca.pem").read_bytes() == ca
    assert "moved ca-key.pem out of" in result.stdout and "delete" in result.stdout
    small = x509.load_pem_x509_certificate((folder / "small.pem").read_bytes())
    small.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))


def test_plan_checks_the_machines_nodes_and_certificates_and_runs_before_the_secrets_exist(make_tiny, tmp_path,
                                                                                             monkeypatch, capsys):
    """`plan --config` on the shipped configs (the README's machines): before any secret is made it plans,
    warning about each; then every disagreement between the Ray config's machines, the nodes and the nodes'
    certificates is an error naming what to change; once they agree it says so."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(variable, raising=False)
    configs = tmp_path / "configs"
    configs.mkdir()
    ray_config = configs / "ray-cluster.yaml"
    shutil.copy(EXAMPLE.parent / "ray-cluster.yaml", ray_config)
    example = yaml.safe_load(EXAMPLE.read_text())
    example.update(model=str(make_tiny("Q4_K_M")), model_paths={})
    config = write(configs, example)
    plan = ["plan", str(make_tiny("Q4_K_M")), "--config", str(config)]

    assert main(plan) in (0, None)
    out, err = capsys.readouterr()
    assert all(name in out for name in ("bigbox", "worker-a", "worker-b"))
    assert f"checked: the nodes are the machines in {ray_config}" in out
    assert "'token_file'" in err and "tls files missing" in err and "no Ray token" in err

    (configs / "kimi-token.txt").write_text(TOKEN)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN)
    certs(str(tmp_path / "kimi-certs"), "--nodes", "bigbox=192.168.1.10,worker-a=192.168.1.11,worker-b=192.168.1.99")
    ray_config.write_text(ray_config.read_text().replace("worker_ips: [192.168.1.11, 192.168.1.12]",
                                                         "worker_ips: [192.168.1.11, 192.168.1.13]"))
    with pytest.raises(SystemExit) as exit_info:
        main(plan)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "bigbox" in out, "the plan is shown all the same"
    assert "warning" not in err
    assert f"node 'worker-b' (192.168.1.12) in {config} is neither head_ip nor among worker_ips in {ray_config}" in err
    assert f"{ray_config} starts Ray on 192.168.1.13, which no node in {config} has as its address" in err
    assert re.search(r"worker-b.pem is for worker-b, 192.168.1.99, not 192.168.1.12 .*make it again with "
                     r"`kimi-cluster certs \S+/kimi-certs --nodes worker-b=192.168.1.12`", err)

    certs(str(tmp_path / "kimi-certs"), "--nodes", "worker-b=192.168.1.12")
    (tmp_path / "kimi-certs-ca" / "ca-key.pem").rename(tmp_path / "kimi-certs" / "ca-key.pem")
    shutil.copy(EXAMPLE.parent / "ray-cluster.yaml", ray_config)
    assert main(plan) in (0, None)
    out, err = capsys.readouterr()
    assert "checked: the nodes are the machines" in out and "checked: each node's certificate names it" in out
    assert "ca-key.pem, which can make certificates every worker trusts, is in the folder copied to every node" \
        in err and "error" not in err


def test_from_dict_names_its_source():
    with pytest.raises(ClusterConfigError, match=r"^head\.yaml: unknown key 'nodez'"):
        ClusterConfig.from_dict({"model": "m.gguf", "nodez": []}, source="head.yaml")


def test_command_line_limits_and_key_win_over_the_file(tmp_path):
    path = write(tmp_path, {"model": "/models/k2.gguf", "context": 2048, "max_sequences": 4, "api_key": "from-file"})
    parse = build_parser().parse_args
    args = parse(["serve", "/models/k2.gguf", "--config", str(path), "--api-key", ""])
    config = cluster_config(args)
    assert (config.context, config.max_sequences, configured_api_key(args, config)) == (2048, 4, "from-file")
    args = parse(["serve", "/models/k2.gguf", "--config", str(path), "--context", "8192", "--max-sequences", "12",
                  "--api-key", "from-flag"])
    config = cluster_config(args)
    # The plan reserves the head's KV cache for what serve will run, so the flags must reach the config.
    assert (config.context, config.max_sequences, configured_api_key(args, config)) == (8192, 12, "from-flag")


def test_interleaved_experts_that_do_not_fit_stay_mapped(make_tiny, capsys):
    from runtime.gguf_file import GGUFModelFile
    model_file = GGUFModelFile(make_tiny("Q4_K_M"))
    expert_bytes = sum(model_file.info(n).nbytes for n in model_file.tensors if "_exps." in n)
    assert repack_that_fits("experts", model_file, available_bytes=10 * expert_bytes) == "experts"
    assert repack_that_fits("head", model_file, available_bytes=0) == "head"
    assert capsys.readouterr().err == ""
    assert repack_that_fits("experts", model_file, available_bytes=expert_bytes // 2) == "none"
    assert repack_that_fits("all", model_file, available_bytes=expert_bytes // 2) == "head"
    assert "do not fit in this machine's" in capsys.readouterr().err
