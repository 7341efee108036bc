"""Secure by default: the API asks for its key everywhere but where left open on purpose, and will not listen
beyond loopback without one; the Ray that kimi-cluster starts refuses callers without its token; a Ray
cluster left open is named in a warning; and no secret of a run (API key, cluster token, Ray token) shows up
in anything the server and its workers write."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from cluster.security import ray_auth
from cluster.security.certs import CA_CERT, NODE_CERT, NODE_KEY, parse_nodes, write_certificates
from cluster.cli.serve import check_exposure
from tests.test_api import parts, start_server, stop_server  # noqa: F401 (parts: a fixture)
from tests.processes import live_descendants
from tests.test_serve import cli, start, stop

KEY = "sk-" + secrets.token_hex(16)
RAY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ray-cluster.yaml"
PATHS = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
         ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens"), ("GET", "/nowhere"),
         ("GET", "/health"), ("GET", "/metrics")]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_loopback_serves_without_a_key(host):
    check_exposure(host, None, no_auth=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "head.lan"])
def test_any_other_address_needs_a_key_or_no_auth(host):
    with pytest.raises(ValueError, match=rf"--host {re.escape(host)} makes the API reachable.*--api-key.*--no-auth"):
        check_exposure(host, None, no_auth=False)
    check_exposure(host, KEY, no_auth=False)
    check_exposure(host, None, no_auth=True)


def test_serve_on_every_interface_without_a_key_exits_saying_why(make_tiny):
    result = subprocess.run(cli("serve", str(make_tiny("Q4_K_M")), "--host", "0.0.0.0"), capture_output=True,
                            text=True, timeout=60, env={**os.environ, "KIMI_API_KEY": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr  # the CLI's exit status for bad input
    assert "no API key is set" in result.stderr and "--no-auth" in result.stderr


@pytest.mark.parametrize("protect_metrics", [False, True])
def test_with_a_key_every_path_asks_for_it_but_those_left_open(parts, protect_metrics):  # noqa: F811
    server = start_server(*parts, api_key=KEY)
    server.service.protect_metrics = protect_metrics
    open_paths = set() if protect_metrics else {"/health", "/metrics"}
    try:
        for method, path in PATHS:
            refused = httpx.request(method, f"{server.url}{path}", json={}, timeout=30)
            wrong = httpx.request(method, f"{server.url}{path}", json={}, headers={"x-api-key": KEY[:-1]},
                                  timeout=30)
            assert (refused.status_code == 401) == (path not in open_paths), (path, refused.status_code)
            assert (wrong.status_code == 401) == (path not in open_paths), (path, wrong.status_code)
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
                assert httpx.request(method, f"{server.url}{path}", json={}, headers=headers,
                                     timeout=30).status_code != 401, path
    finally:
        stop_server(server)


# ---- Ray, and what a run writes ----

GCS_WITHOUT_TOKEN = textwrap.dedent("""
    import sys, ray
    try:
        context = ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False,
                           _node_ip_address="127.0.0.1")
    except Exception as e:
        print(type(e).__name__, e)
        sys.exit(3)
    print(len(ray.nodes()), "nodes, dashboard:", context.dashboard_url or "none")
""")


def ray_init_from_elsewhere(address: str, home: Path, token: str | None) -> subprocess.CompletedProcess:
    """`ray.init(address)` in a process of another user's home, with `token` in its environment (token mode
    on, as the README's start commands set it) or none."""
    # (and without the tests' long wait for a GCS, which a refused driver would sit out in full)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_gcs"))}
    env |= {"HOME": str(home), **({"RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token"} if token else {})}
    return subprocess.run([sys.executable, "-c", GCS_WITHOUT_TOKEN, address], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.slow
def test_a_served_cluster_refuses_ray_callers_without_its_token_and_logs_no_secret(make_tiny, tmp_path):
    """`serve --workers 2` with an API key, a cluster token and mutual TLS, in a home of its own: its Ray
    refuses a caller without the token (and has no Jobs API to submit to); nothing it writes (its output, Ray's
    logs, /health, /metrics, error replies) holds a secret of the run; the token files are its owner's only."""
    home, temp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="ks-"))  # short: Ray's socket paths
    home.mkdir()
    cluster_token = secrets.token_hex(32)
    (tmp_path / "token").write_text(cluster_token)
    write_certificates(tmp_path / "certs", parse_nodes("head=127.0.0.1,worker-1=127.0.0.1,worker-2=127.0.0.1"))
    certs = tmp_path / "certs"
    (tmp_path / "cluster.yaml").write_text(json.dumps({
        "token_file": "token", "reserve_gb": 0,
        "tls": {"ca": str(certs / CA_CERT), "cert": str(certs / NODE_CERT), "key": str(certs / NODE_KEY)}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(home), "TMPDIR": str(temp), "KIMI_API_KEY": KEY}
    process = start(cli("serve", str(make_tiny("Q4_K_M")), "--workers", "2", "--port", "0", "--threads", "1",
                        "--config", str(tmp_path / "cluster.yaml"), "--model-name", "tiny"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = ready_url(process)
        ray_token = (home / ".ray" / "auth_token").read_text()
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600 and len(ray_token) >= 32
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
        assert reply.usage.completion_tokens == 4
        written = [httpx.get(f"{url}{path}", timeout=30).text for path in ("/health", "/metrics")]
        written.append(httpx.get(f"{url}/v1/models", headers={"x-api-key": KEY[::-1]}, timeout=30).text)

        address = gcs_address(temp)
        refused = ray_init_from_elsewhere(address, tmp_path, token=None)
        assert refused.returncode == 3 and "Authentication token is missing" in refused.stderr, refused.stderr
        let_in = ray_init_from_elsewhere(address, tmp_path, token=ray_token)
        # one node, and no dashboard: no Jobs API to submit code to
        assert let_in.returncode == 0 and "1 nodes, dashboard: none" in let_in.stdout, let_in.stdout + let_in.stderr

        logs = {p: p.read_text(errors="replace") for p in temp.glob("kimi-ray-*/session_*/logs/*") if p.is_file()}
        assert logs, "Ray's logs were found"
    finally:
        stop(process)
        shutil.rmtree(temp, ignore_errors=True)
    written += [process.stdout.read(), process.stderr.read()]
    for secret, name in ((KEY, "API key"), (cluster_token, "cluster token"), (ray_token, "Ray token")):
        assert not [p for p, text in logs.items() if secret in text], f"the {name} is in Ray's logs"
        assert not [text for text in written if secret in text], f"the {name} is in the output or a reply"


def gcs_address(temp: Path) -> str:
    """Where the GCS whose session files are under `temp` listens: Ray writes its port there."""
    (port_file,) = temp.glob("kimi-ray-*/session_2*/gcs_server_port_*")
    return f"127.0.0.1:{port_file.read_text().strip()}"


def ready_url(process: subprocess.Popen) -> str:
    url = None
    for line in process.stderr:
        if (match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)):
            url = match.group(1)
            break
    assert url, "serve did not print its address"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, f"serve exited: {process.stderr.read()}"
        with contextlib.suppress(httpx.ConnectError):
            if httpx.get(f"{url}/health", timeout=30).status_code == 200:
                return url
        assert time.monotonic() < deadline, "serve did not become ready"
        time.sleep(0.3)


@pytest.mark.slow
def test_the_configs_head_refuses_jobs_and_drivers_without_the_token(tmp_path):
    """configs/ray-cluster.yaml's head start command, run here as written (with this venv's ray, a temp dir of
    its own, and no autoscaler, as there is no worker to start): Ray's Jobs API and its GCS refuse a caller
    without the token in ~/.ray/auth_token; with it, a job runs."""
    config = yaml.safe_load(RAY_CONFIG.read_text())
    command = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    command = command.replace("~/kimi-venv/bin/ray", str(Path(sys.executable).parent / "ray"))
    command = command.replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")
    temp = Path(tempfile.mkdtemp(prefix="kr-"))  # short: Ray's socket paths must fit in 107 bytes
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    ray_auth.write_token(home / ".ray" / "auth_token")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    job = ["ray", "job", "submit", "--address", "http://127.0.0.1:8265", "--", "python", "-c", "print(6 * 7)"]
    before = set(live_descendants())
    try:
        subprocess.run(["bash", "-c", f"{command} --temp-dir={temp}"], env={**env, "HOME": str(home)},
                       capture_output=True, text=True, timeout=300, check=True)
        refused = subprocess.run(job, env={**env, "HOME": str(stranger)}, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr
        assert ray_init_from_elsewhere("127.0.0.1:6379", stranger, token=None).returncode == 3
        ran = subprocess.run(job, env={**env, "HOME": str(home), "RAY_AUTH_MODE": "token"}, capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == 0 and "42" in ran.stdout, ran.stdout + ran.stderr
    finally:
        for pid in set(live_descendants()) - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


OPEN_RAY = textwrap.dedent("""
    import sys, time
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["disabled", "token"])
def test_a_ray_cluster_answering_without_a_token_is_told_apart(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("HOME", str(tmp_path))  # this machine's own token file is not the question here
    temp = Path(tempfile.mkdtemp(prefix="kt-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"HOME": str(tmp_path), "RAY_AUTH_MODE": mode, "TMPDIR": str(temp)}
    if mode == "token":
        ray_auth.write_token(tmp_path / ".ray" / "auth_token")
    ray = start([sys.executable, "-c", OPEN_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        address = ray.stdout.readline().strip()
        assert address, "the Ray cluster did not start"
        assert ray_auth.answers_without_token(address) == (mode == "disabled")
        warnings = ray_auth.exposure_warnings(address, None)
        assert bool(warnings) == (mode == "disabled")
        assert all("RAY_AUTH_MODE=token" in w for w in warnings)
    finally:
        ray.stdin.close()
        ray.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_dashboard_beyond_loopback_and_a_token_others_can_read_are_warned_about(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setattr(ray_auth, "answers_without_token", lambda address: False)
    assert ray_auth.exposure_warnings("10.0.0.1:6379", "127.0.0.1:8265") == []
    (warning,) = ray_auth.exposure_warnings("10.0.0.1:6379", "http://10.0.0.1:8265")
    assert "10.0.0.1:8265" in warning and "ray dashboard" in warning
    ray_auth.write_token(tmp_path / ".ray" / "auth_token")
    assert ray_auth.exposure_warnings("10.0.0.1:6379", None) == []
    (tmp_path / ".ray" / "auth_token").chmod(0o644)
    (warning,) = ray_auth.exposure_warnings("10.0.0.1:6379", None)
    assert "chmod 600" in warning
