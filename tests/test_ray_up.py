"""The README's "Run on your machines" steps, run as written on three emulated machines
(tests/cluster_machines.py): the commands are read from the README itself, and only the values a user edits
change (the machines' addresses, the SSH user and key, the repository URL, the model's path, the memory each
node offers). This process plays the laptop `ray up` runs from, and the API's client outside the cluster.
`ray attach`'s shell on the head is stood in for by SSH to it (an interactive bash, as attach opens), the
optional `ray dashboard` is left out, `--yes` answers the question `ray up` and `ray down` ask, and `ray up`
logs in record style (the same steps, with their timers). Then the failures a LAN has, each in the middle of
a stream: a worker's cable pulled and plugged back, a worker machine power-cycled.

The machines reach no registry: pip on them installs from a wheelhouse gathered once (tests/wheelhouse.py).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.cluster_machines import Machine, cannot_emulate, emulated_machines
from tests.wheelhouse import build_wheelhouse

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
# The README's example values, and the machine each stands for.
README_ADDRESSES = ["192.168.1.10", "192.168.1.11", "192.168.1.12"]
README_MODEL = "/models/kimi/UD-Q2_K_XL/Kimi-K2.6-UD-Q2_K_XL-00001-of-00008.gguf"
README_REPOSITORY = "https://github.com/YOUR-ORG/kimi-cluster.git"
NODE_MEMORY_GB = 4  # what each emulated machine offers (they share this one's memory)
LAPTOP_STATE = [Path("/tmp/ray/cluster-kimi.state"), Path("/tmp/ray/cluster-kimi.lock")]

WHY_NOT = cannot_emulate() or (None if shutil.which("rsync") else "`ray up` copies files with rsync, not found")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


def readme_steps() -> dict[int, list[str]]:
    """Step number -> the bash blocks of that step of "Run on your machines"."""
    section = README.read_text().split("\n## Run on your machines\n")[1].split("\n## ")[0].split("\n### ")[0]
    pieces = re.split(r"^(\d+)\. ", section, flags=re.M)
    return {int(number): [textwrap.dedent(block) for block in re.findall(r"```bash\n(.*?)```", text, re.S)]
            for number, text in zip(pieces[1::2], pieces[2::2])}


class Laptop:
    """Where `ray up` runs: this machine, with a home of its own and the clone of the commit under test."""

    def __init__(self, folder: Path, repository: Path):
        self.home, self.repository = folder / "home", repository
        self.home.mkdir(parents=True)

    def run(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {"HOME": str(self.home), "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": "C.UTF-8"}
        done = subprocess.run(["bash", "-c", script], cwd=self.repository, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{script}\nexited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                     f"{done.stderr[-3000:]}"
        return done


def on_head(head: Machine, script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A script in the shell `ray attach` opens on the head (interactive: ~/.bashrc puts the venv first), in
    the clone, as step 4 says."""
    done = head.ssh(f"bash -ic {shlex.quote('cd ~/kimi-cluster && ' + script)}", timeout=timeout, check=False)
    assert done.returncode == 0, f"{script}\nexited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@dataclass
class ServedCluster:
    """The README's cluster, serving: three machines, `serve` on the head, an API client from outside."""
    head: Machine
    workers: list[Machine]
    model: Path
    client: openai.OpenAI
    console: Path  # what `serve` printed
    timings: dict[str, float]

    def health(self) -> dict:
        return httpx.get(f"http://{self.head.address}:8000/health", timeout=10).json()

    def is_whole(self) -> bool:
        health = self.health()
        return health["status"] == "ok" and set(health["workers"].values()) == {"ok"}

    def count(self, metric: str, node: str) -> float:
        """A per-node counter from /metrics (0 before it is first counted)."""
        text = httpx.get(f"http://{self.head.address}:8000/metrics", timeout=10).text
        found = re.search(rf'^{metric}_total{{node="{node}"}} (\S+)$', text, re.M)
        return float(found[1]) if found else 0.0

    @functools.cached_property
    def alone(self) -> str:
        """What one process answers to `stream(SHORT_STREAM)`."""
        alone = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", str(self.model), "--chat",
                                "--prompt", "Hello", "--max-tokens", str(SHORT_STREAM), "--json", "--speculate", "off"],
                               capture_output=True, text=True, check=True)
        return json.loads(alone.stdout)["text"]

    @functools.cached_property
    def long_stream(self) -> int:
        """Tokens enough for a stream to outlast a fault several times over at this machine's speed (800
        tokens once took 8 s, as long as the outage itself), within the served context."""
        assert self.is_whole()
        _, arrivals = stream(self.client, SPEED_PROBE)
        per_second = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        return int(min(MOST_TOKENS, max(800, per_second * 4 * OUTAGE_S)))

    @functools.cached_property
    def healthy(self) -> str:
        """What the cluster answers to `stream(long_stream)` with every machine up."""
        assert self.is_whole()
        return stream(self.client, self.long_stream)[0]


@pytest.fixture(scope="module")
def cluster(make_tiny):
    steps = readme_steps()
    shared = Path(tempfile.mkdtemp(prefix="kimi-shared-", dir="/var/tmp"))  # seen by every machine
    timings: dict[str, float] = {}
    started = time.monotonic()

    def timed(name: str) -> None:
        nonlocal started
        timings[name] = time.monotonic() - started
        started = time.monotonic()
    try:
        for leftover in LAPTOP_STATE:  # from an earlier run that could not clean up
            leftover.unlink(missing_ok=True)
        repository = shared / "kimi-cluster"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(repository)], check=True)
        wheels = build_wheelhouse(shared / "wheels", repository, ray_requirement(repository))
        model = shared / "models" / "kimi-tiny.gguf"
        model.parent.mkdir()
        shutil.copy(make_tiny("Q4_K_M"), model)
        timed("clone, wheelhouse")
        with emulated_machines(3, {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}) as machines:
            head = machines[0]
            addresses = dict(zip(README_ADDRESSES, (m.address for m in machines)))

            def ours(text: str) -> str:
                for theirs, mine in [*addresses.items(), (README_MODEL, str(model)),
                                     (README_REPOSITORY, str(repository))]:
                    text = text.replace(theirs, mine)
                return text
            laptop = Laptop(shared / "laptop", repository)
            for block in steps[2]:
                laptop.run(ours(block))
            ray_config = repository / "configs" / "ray-cluster.yaml"
            ray_config.write_text(ours(ray_config.read_text()).replace("ssh_user: kimi", "ssh_user: root")
                                  .replace("~/.ssh/id_ed25519", str(head.key)))
            timed("secrets")
            (up,) = [line for line in steps[3][0].splitlines() if line.startswith("ray up ")]
            try:
                # Record style: plain lines, with timers for the head's setup and Ray start among them.
                started_up = laptop.run(answered(up).replace("ray up ", "ray up --log-style record ", 1),
                                        timeout=1800)
                timed("ray up: the head set up, Ray started")
                wait_for_nodes(head, len(machines))
                timed("ray up: every worker in")
                monitor = head.ssh("cat /tmp/ray/session_latest/logs/monitor.*", check=False).stdout
                names = dict(zip((m.address for m in machines), ("bigbox", "worker-a", "worker-b")))
                timings.update(node_setup_times(started_up.stdout + started_up.stderr + monitor, names))
                console = shared / "serve-console.txt"
                serve = run_the_head_steps(head, steps, ours, console)
                timed("plan, serve ready")
                key = head.ssh("cat ~/kimi-api-key").stdout.strip()
                client = openai.OpenAI(base_url=f"http://{head.address}:8000/v1", api_key=key, max_retries=0)
                try:
                    yield ServedCluster(head, machines[1:], model, client, console, timings)
                finally:
                    serve.kill()
                    on_head(head, "pkill -f 'kimi-cluster serve' || true")
            finally:
                started = time.monotonic()
                down = laptop.run(answered("ray down configs/ray-cluster.yaml"), timeout=600)
                timed("ray down")
                print(down.stdout[-500:])
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        for leftover in LAPTOP_STATE:  # what Ray's local provider keeps on the laptop about the cluster
            leftover.unlink(missing_ok=True)
        print("wall time per step: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))


def test_the_readme_cluster_steps_serve_from_three_machines(cluster):
    """A chat completion through the openai client from outside the cluster equals one process's answer."""
    started = time.monotonic()
    text, arrivals = stream(cluster.client, SHORT_STREAM)
    cluster.timings["first token"] = arrivals[0] - started
    assert text == cluster.alone
    # Ray counts every core of every machine (each emulated one has all of this one's)
    assert ask_ray(cluster.head, "ray.cluster_resources()['CPU']") == 3 * len(os.sched_getaffinity(0))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://{cluster.head.address}:8000/v1", api_key="wrong",
                      max_retries=0).models.list()


def test_every_node_gets_the_certificates_and_none_the_cas_key(cluster):
    """The secrets `ray up` copied: on every machine the CA's certificate and the nodes' certificates and keys
    (the expert traffic ran on them), and nowhere the CA's key, which stays where `certs` ran."""
    for machine, node in zip([cluster.head, *cluster.workers], ("bigbox", "worker-a", "worker-b")):
        listed = machine.ssh("ls -A ~/kimi-certs").stdout.split()
        assert {"ca.pem", f"{node}.pem", f"{node}-key.pem"} <= set(listed), listed
        assert machine.ssh("find ~ -name ca-key.pem").stdout == "", f"the CA's key on {node}"


SHORT_STREAM = 12  # tokens
SPEED_PROBE = 200  # tokens streamed to measure the cluster's decode speed
MOST_TOKENS = 3500  # a stream the served context (4,096 tokens at least) holds beside the prompt
OUTAGE_S = 8  # a cable pulled for a few seconds: past the deadline, short of Ray's giving the node up


def stream(client: openai.OpenAI, max_tokens: int, fault=None, at_token: int = 20) -> tuple[str, list[float]]:
    """A greedy chat completion's text and when each piece came; `fault` runs on a thread from the
    `at_token`th piece on while the stream is read on, and is waited for."""
    pieces = client.chat.completions.create(model=client.models.list().data[0].id, stream=True,
                                            max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": "Hello"}])
    text, arrivals, running = "", [], None
    with ThreadPoolExecutor(1) as pool:
        for chunk in pieces:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                arrivals.append(time.monotonic())
                if fault and len(arrivals) == at_token:
                    running = pool.submit(fault)
        if running:
            running.result()
    return text, arrivals


def wait_until(condition, what: str, timeout: float = 300) -> float:
    """Seconds until `condition()` held."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started


def test_a_workers_link_goes_down_mid_stream_and_comes_back(cluster):
    """The switch port of worker-a's machine goes down in the middle of a stream and up again: the stream
    goes on without it and ends as it would have, and the worker takes its experts back."""
    healthy, worker, node = cluster.healthy, cluster.workers[0], "worker-a"
    failovers, rejoins = cluster.count("kimi_worker_failovers", node), cluster.count("kimi_worker_rejoins", node)
    nodes = ray_nodes(cluster.head)
    events: dict[str, float] = {}

    def pull_the_cable():
        worker.unplug()
        events["unplugged"] = time.monotonic()
        cluster.timings["link down: degraded after"] = wait_until(
            lambda: cluster.health()["status"] == "degraded", "degraded")
        time.sleep(max(0.0, events["unplugged"] + OUTAGE_S - time.monotonic()))
        worker.plug()
        events["plugged"] = time.monotonic()
        cluster.timings["link up: whole again after"] = wait_until(cluster.is_whole, "whole again")
    text, arrivals = stream(cluster.client, cluster.long_stream, pull_the_cable)
    assert text == healthy
    assert arrivals[0] < events["unplugged"] and events["plugged"] < arrivals[-1], "the outage was not mid-stream"
    assert cluster.count("kimi_worker_failovers", node) == failovers + 1
    assert cluster.count("kimi_worker_rejoins", node) == rejoins + 1
    assert ray_nodes(cluster.head) == nodes, "Ray gave the node up"
    assert stream(cluster.client, SHORT_STREAM)[0] == cluster.alone
    said = cluster.console.read_text()
    assert f"{node} is down (" in said and f"{node} is back after" in said and "Traceback" not in said


def test_a_worker_machine_reboots_mid_stream(cluster):
    """worker-b's machine loses power in the middle of a stream and boots (sshd only): the stream ends as it
    would have; Ray's autoscaler on the head runs the config's worker start commands on it again, and the
    head starts its expert worker there, which takes its experts back."""
    healthy, worker, node = cluster.healthy, cluster.workers[1], "worker-b"
    failovers, rejoins = cluster.count("kimi_worker_failovers", node), cluster.count("kimi_worker_rejoins", node)
    before = ray_nodes(cluster.head)[worker.address]
    events: dict[str, float] = {}

    def power_cycle():
        events["rebooted"] = time.monotonic()
        worker.reboot()
    text, arrivals = stream(cluster.client, cluster.long_stream, power_cycle)
    assert text == healthy
    assert arrivals[0] < events["rebooted"] < arrivals[-1]
    wait_until(lambda: ray_nodes(cluster.head).get(worker.address, before) != before, "Ray back on the machine")
    cluster.timings["reboot: Ray back after"] = time.monotonic() - events["rebooted"]
    wait_until(cluster.is_whole, "whole again")
    cluster.timings["reboot: whole again after"] = time.monotonic() - events["rebooted"]
    assert len(ray_nodes(cluster.head)) == 3
    assert cluster.count("kimi_worker_failovers", node) == failovers + 1
    assert cluster.count("kimi_worker_rejoins", node) == rejoins + 1
    assert stream(cluster.client, SHORT_STREAM)[0] == cluster.alone
    said = cluster.console.read_text()
    assert f"{node} is down (" in said and f"{node} is back after" in said and "Traceback" not in said


def node_setup_times(log: str, names: dict[str, str]) -> dict[str, float]:
    """Seconds each node spent on setup_commands and on its Ray start commands, from the timers Ray's node
    updaters log (the head's in `ray up`'s output, the workers' in the autoscaler's log on the head)."""
    timers = re.findall(r"NodeUpdater: (\S+): (Setup|Ray start) commands succeeded \[LogTimer=(\d+)ms\]", log)
    return {f"{what.lower()} on {names.get(node, node)}": int(ms) / 1000 for node, what, ms in timers}


def answered(command: str) -> str:
    """`ray up` and `ray down` ask before they act, and refuse to ask without a terminal: --yes answers."""
    return re.sub(r"^ray (up|down) ", r"ray \1 --yes ", command)


def ray_requirement(repository: Path) -> str:
    """The Ray the config's setup installs on the nodes, e.g. ray[default]==2.60.0."""
    setup = " ".join(yaml.safe_load((repository / "configs" / "ray-cluster.yaml").read_text())["setup_commands"])
    return re.search(r'"(ray\[default\]==[^"]+)"', setup)[1]


def ask_ray(head: Machine, expression: str):
    """`expression` evaluated by a Ray driver on the head, through JSON (None while Ray does not answer)."""
    script = f"import json, ray; ray.init(logging_level='ERROR'); print(json.dumps({expression}))"
    answer = head.ssh(f"RAY_AUTH_MODE=token ~/kimi-venv/bin/python -c {shlex.quote(script)}", check=False,
                      timeout=120)
    first = answer.stdout.split("\n")[0]  # the driver prints the autoscaler's events after it
    return json.loads(first) if answer.returncode == 0 and first else None


def ray_nodes(head: Machine) -> dict[str, str]:
    """Address -> Ray's node id of every node Ray on the head counts alive."""
    return ask_ray(head, "{n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}") or {}


def wait_for_nodes(head: Machine, count: int, timeout: float = 900) -> None:
    """Until Ray on the head counts `count` alive nodes (the autoscaler starts the workers after `ray up`)."""
    deadline = time.monotonic() + timeout
    while len(ray_nodes(head)) < count:
        assert time.monotonic() < deadline, "not every node joined"
        time.sleep(5)


def run_the_head_steps(head: Machine, steps: dict[int, list[str]], ours, console: Path) -> subprocess.Popen:
    """Steps 4 to 6 on the head: the cluster config, the token, plan, then serve (left running, what it prints
    going to `console`)."""
    example = yaml.safe_load(ours((REPO / "configs" / "cluster.example.yaml").read_text()))
    example["model_paths"] = {}  # every machine sees the model at the same path
    example["reserve_gb"] = 1
    for node in example["nodes"]:
        node["memory_gb"] = NODE_MEMORY_GB
    on_head(head, f"cp configs/cluster.example.yaml configs/cluster.yaml && cat > configs/cluster.yaml << 'EOF'\n"
                  f"{yaml.safe_dump(example)}EOF")
    for block in steps[4]:
        on_head(head, ours(block))
    plan = on_head(head, ours(steps[5][0]))
    assert all(name in plan.stdout for name in ("bigbox", "worker-a", "worker-b")), plan.stdout
    # the nodes checked against the Ray config `ray up` left on the head, and against their certificates
    assert "checked: the nodes are the machines in /root/ray_bootstrap_config.yaml" in plan.stdout, plan.stdout
    assert "checked: each node's certificate names it and its address" in plan.stdout, plan.stdout
    assert "kimi-cluster: warning" not in plan.stderr, plan.stderr
    key_block, serve_block = steps[6][0].strip().splitlines()
    on_head(head, key_block)
    model_line = ours(steps[5][0]).splitlines()[0]
    # Drafts off: the fault tests compare a stream with an earlier one bit for bit, and with the README's
    # kernels (the head repacked) a drafted row is rounded with the rows of its step, while drafts come from the
    # server's recent replies too: two runs of one request can part at a near-tie. Drafts through a lost worker
    # are tested under --deterministic (tests/test_speculative.py).
    serve_command = f"cd ~/kimi-cluster && {model_line} && {ours(serve_block)} --speculate off"
    with console.open("w") as out:
        serve = subprocess.Popen(head.ssh_command(f"bash -ic {shlex.quote(serve_command)}"), stdout=out,
                                 stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        assert serve.poll() is None, f"serve exited:\n{console.read_text()}"
        try:
            if httpx.get(f"http://{head.address}:8000/health", timeout=10).status_code == 200:
                return serve
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not become ready"
        time.sleep(2)
