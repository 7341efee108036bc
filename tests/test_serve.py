"""`kimi-cluster serve --workers 2` as users run it: a real process with a local Ray cluster and two expert
workers, driven by the official openai client; its greedy text equals `kimi-cluster generate`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

PROMPT = "Pool the memory of three machines and"
MAX_TOKENS = 16


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", *args]


def start(command: list[str], **options) -> subprocess.Popen:
    """A child that answers SIGINT with KeyboardInterrupt even when this run ignores SIGINT (started in the
    background, or by a CI runner): an ignored signal stays ignored across exec, a handled one does not."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, **options)
    finally:
        signal.signal(signal.SIGINT, previous)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM first, so the server stops its Ray cluster; SIGKILL only if it does not exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def served(make_tiny):
    path = make_tiny("Q4_K_M")
    # --deterministic: the same kernels as `generate --repack none` below, so the same text exactly.
    process = start(cli("serve", str(path), "--workers", "2", "--port", "0", "--threads", "1", "--deterministic"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "KIMI_API_KEY": ""})
    url = None
    for line in process.stderr:  # the first line names the address, before the model loads
        if (match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)):
            url = match.group(1)
            break
    assert url, "serve did not print its address"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health", timeout=30).status_code != 200:
        assert process.poll() is None and time.monotonic() < deadline, "serve did not become ready"
        time.sleep(0.2)
    yield path, url, process
    stop(process)


def generate(path, *extra: str) -> str:
    out = subprocess.run(cli("generate", str(path), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
                             "--json", "--repack", "none", *extra), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["text"]


def test_openai_client_with_experts_on_two_workers_equals_generate(served):
    path, url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    expected = generate(path)
    completion = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT,
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert completion.choices[0].text == expected
    streamed = client.completions.create(model=completion.model, prompt=PROMPT, max_tokens=MAX_TOKENS,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    expected_chat = generate(path, "--chat")
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model=completion.model, messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0)
    assert chat.choices[0].message.content == expected_chat
    chunks = client.chat.completions.create(model=completion.model, messages=messages, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected_chat


def test_health_and_metrics_show_both_workers(served):
    _, url, _ = served
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["workers"] == {"worker-1": "ok", "worker-2": "ok"}
    samples = {(s.name, s.labels.get("node")): s.value for family in text_string_to_metric_families(
        httpx.get(f"{url}/metrics").text) for s in family.samples}
    for node in ("worker-1", "worker-2"):
        assert samples[("kimi_worker_round_trip_seconds_count", node)] > 0
        assert samples[("kimi_expert_activations_total", node)] > 0
    assert samples[("kimi_expert_activations_total", "head")] > 0


def expert_worker_pids() -> list[int]:
    """Processes whose title Ray set to its ExpertWorker actor."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ExpertWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else None
        except OSError:
            continue
        if stat:
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry.name))
    found, frontier = set(), [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, ())]
        found.update(frontier)
    return found


def all_gone(pids, timeout_s: float = 10) -> bool:
    """Whether every one of `pids` has exited (a zombie waiting to be reaped counts as exited)."""
    def alive(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_dead_worker_turns_requests_and_health_into_errors_naming_it(served):
    _, url, process = served
    workers = expert_worker_pids()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 503 and time.monotonic() - started < 10
    error = response.json()["error"]
    assert error["code"] == "worker_failed" and re.search(r"node worker-[12]", error["message"])
    health = httpx.get(f"{url}/health", timeout=30)
    assert health.status_code == 503 and health.json()["status"] == "error"
    assert sum(state != "ok" for state in health.json()["workers"].values()) == 1


def test_ctrl_c_stops_the_server_and_its_workers(served):
    _, url, process = served
    workers = expert_worker_pids()
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    assert all_gone(workers)


def test_chat_keeps_the_conversation_and_reset_forgets_it(make_tiny):
    path = make_tiny("Q4_K_M")
    session = subprocess.run(cli("chat", str(path), "--max-tokens", "8"), input="hello\nhello\n/reset\nhello\n",
                             capture_output=True, text=True, timeout=120)
    assert session.returncode == 0, session.stderr
    assert "http://" not in session.stderr and "/reset forgets the conversation, Ctrl-D quits" in session.stderr
    # stdout: a "> " prompt before each line read, each reply after its prompt; /reset answers nothing.
    replies = [part.strip("\n") for part in session.stdout.split("> ")[1:] if part.strip("\n")]
    assert len(replies) == 3
    assert replies[2] == replies[0]  # after /reset the same question gets the same greedy answer
    assert replies[1] != replies[0]  # with the first exchange in the prompt, the answer changes


def test_sigterm_stops_a_server_and_its_workers_cleanly_with_one_line(make_tiny):
    others = set(expert_worker_pids())
    process = start(cli("serve", str(make_tiny("Q4_K_M")), "--port", "0", "--workers", "1", "--threads", "1"),
                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in process.stderr:
            if "ready at" in line:
                break
        workers = set(expert_worker_pids()) - others
        assert workers
        ray_commands = [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                        for pid in descendants(process.pid)]
        assert not any("ray-dashboard-" in command for command in ray_commands)  # no dashboard modules
        session_dirs = {match[0] for command in ray_commands for match in [re.search(r"/tmp/kimi-ray-\w+", command)]
                        if match}
        assert len(session_dirs) == 1
        process.terminate()
        assert process.wait(timeout=30) == 0
        after = process.stderr.read()
        assert after.strip().splitlines() == ["kimi-cluster: stopped (SIGTERM)"], after  # no Ray stack dump
        assert all_gone(workers)
        assert not Path(session_dirs.pop()).exists()  # Ray's session files went with it
    finally:
        stop(process)
