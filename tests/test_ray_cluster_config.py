"""configs/ray-cluster.yaml: Ray accepts it, and it sets up what kimi-cluster relies on.

Three layers, none of which touches the network or another machine:
- the raw file against the JSON schema shipped inside the installed ray package;
- the file through the same preparation and validation `ray up` runs before it SSHes anywhere
  (for the local provider every step of it is offline);
- every `ray start` command through Ray's own command-line parser, so a misspelt flag or a bad
  --resources value fails here rather than on someone's head node.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "ray-cluster.yaml"
EXPERT_PORT = 50551
API_PORT = 8000


@pytest.fixture(scope="module")
def text() -> str:
    return CONFIG_PATH.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def ray_start_args(command: str) -> list[str]:
    """The arguments after `ray start` in a shell command line, expanded as bash would on a node.

    `$RAY_HEAD_IP` gets an example value; everything else must be literal.
    """
    (part,) = [p for p in re.split(r";|&&", command) if re.search(r"\bray start\b", p)]
    part = part.replace("$RAY_HEAD_IP", "192.168.1.10")
    assert "$" not in part, f"unexpected shell expansion in {part!r}"
    words = shlex.split(part)
    return words[words.index("start") + 1 :]


def parse_ray_start(command: str) -> dict:
    """Parse with the click command behind `ray start` (parsing only: nothing is started)."""
    from ray.scripts.scripts import start

    ctx = start.make_context("ray start", ray_start_args(command))
    return ctx.params


def start_command(commands: list[str]) -> str:
    (cmd,) = [c for c in commands if re.search(r"\bray start\b", c)]
    return cmd


# -- Ray's own checks -------------------------------------------------------------------------------


def test_matches_rays_json_schema(config):
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config, schema)


def test_passes_ray_up_preparation_and_validation(config):
    """What `ray up` does to the file before contacting any machine (commands._bootstrap_config):
    prepare_config (local provider defaults, one node type, min/max workers from worker_ips),
    the provider's resource fill-out, validate_config (schema plus Ray's cross-field checks)
    and the provider's bootstrap. no_config_cache keeps it from writing Ray's cache file."""
    pytest.importorskip("jsonschema")  # validate_config needs it, as `ray up` does
    commands = pytest.importorskip("ray.autoscaler._private.commands")
    prepared = commands._bootstrap_config(copy.deepcopy(config), no_config_cache=True)

    (node_type,) = prepared["available_node_types"].values()
    n_workers = len(config["provider"]["worker_ips"])
    # every listed machine is started and kept: nothing to scale
    assert node_type["min_workers"] == node_type["max_workers"] == n_workers
    assert prepared["max_workers"] == n_workers


@pytest.mark.parametrize("which", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_start_commands_parse(config, which):
    pytest.importorskip("ray.scripts.scripts")
    params = parse_ray_start(start_command(config[which]))
    # kimi_node: 1 on every node, head included, so ExpertWorkers spread one per machine
    assert json.loads(params["resources"]) == {"kimi_node": 1}
    # Ray counts the cores: nproc would say 1, obeying the OMP_NUM_THREADS=1 Ray exports for these commands
    assert params["num_cpus"] is None
    # pinned so the firewall can be opened for them
    assert params["object_manager_port"] and params["node_manager_port"]
    if which == "head_start_ray_commands":
        assert params["head"] and params["port"] == 6379
        # the dashboard's Jobs API runs code: it stays on the head's loopback (reached over SSH)
        assert params["dashboard_host"] in ("localhost", "127.0.0.1")
        # without it the head never starts the workers listed in provider.worker_ips
        assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    else:
        assert not params["head"] and params["address"] == "192.168.1.10:6379"
        # nodes of different distributions have different Python patch versions, which Ray refuses by default
        assert "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor" in start_command(config[which]).split("ray start")[0]


# -- what kimi-cluster relies on (no ray needed) -------------------------------------------------------


def test_local_provider_with_placeholder_lan_ips(config):
    provider = config["provider"]
    assert provider["type"] == "local"
    for ip in [provider["head_ip"], *provider["worker_ips"]]:
        assert ip.startswith("192.168.1."), ip
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    assert config["max_workers"] == len(provider["worker_ips"])


def test_setup_installs_kimi_cluster(config):
    setup = " ".join(config["setup_commands"])
    # one Python version named for every node: plain python3 differs between distributions, and Ray refuses a mix
    assert re.search(r"(^| )python3\.\d+ -m venv ~/kimi-venv", setup)
    assert "pip install" in setup and "kimi-cluster" in setup
    # start commands use the venv's ray, so setup must put ray there
    assert "ray[default]" in setup


def test_kimi_node_resource_in_both_start_commands(config):
    for which in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmd = start_command(config[which])
        assert re.search(r"--resources='\{\"kimi_node\": ?1\}'", cmd), cmd
        assert config[which][0].endswith("ray stop"), "stop any old Ray first"
    assert "--address=$RAY_HEAD_IP:6379" in start_command(config["worker_start_ray_commands"])


def test_every_node_starts_ray_with_token_authentication(config):
    """RAY_AUTH_MODE=token set in the shell line that runs `ray start`, on the head and on every worker, and the
    token (and the expert traffic's certificates) copied to every node."""
    for which in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = start_command(config[which])
        parts = [p.strip() for p in re.split(r";|&&", command)]
        starts = next(i for i, p in enumerate(parts) if re.search(r"\bray start\b", p))
        assert any(re.match(r"export (\S+ )*RAY_AUTH_MODE=token\b", p) for p in parts[:starts]), command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "~/kimi-certs" in config["file_mounts"]


def test_firewall_ports_documented(text):
    for port in (6379, 8265, 8076, 8077, EXPERT_PORT, API_PORT):
        assert re.search(rf"^#.*\b{port}\b", text, re.M), f"port {port} not explained"
