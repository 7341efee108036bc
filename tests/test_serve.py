"""`kimi-cluster serve --workers 2` as users run it: a real process with a local Ray cluster and two expert
workers, driven by the official openai client; its greedy text equals `kimi-cluster generate`."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
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
    yield path, ready_url(process), process
    stop(process)


def ready_url(process: subprocess.Popen) -> str:
    """The address a starting `serve` (stderr piped) prints, once its model has loaded."""
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
    return url


def generate(path, *extra: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:
    """The greedy answer of one process, cold (--repack none: the kernels --deterministic serves with)."""
    out = subprocess.run(cli("generate", str(path), "--prompt", prompt, "--max-tokens", str(max_tokens),
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
    samples = metric_samples(url)
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


STREAM_PROMPTS = [f"{PROMPT} {word}" for word in ("first", "second", "third", "fourth")]
STREAM_TOKENS = 64


def concurrent_streams(url: str, prompts: list[str], max_tokens: int, after_tokens=None) -> list[str]:
    """Stream greedy completions of all prompts at once; after_tokens() runs once every stream has a few
    tokens (the fault goes there). Returns each stream's text."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    texts, errors, started = [""] * len(prompts), [], threading.Barrier(len(prompts) + 1)

    def stream(i: int) -> None:
        try:
            chunks = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens,
                                               temperature=0, stream=True)
            for count, chunk in enumerate(chunks, 1):
                texts[i] += chunk.choices[0].text if chunk.choices else ""
                if count == 4:
                    started.wait(timeout=60)
        except Exception as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)
            started.abort()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        started.wait(timeout=60)
        if after_tokens is not None:
            after_tokens()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    return texts


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def wait_for_health(url: str, status: str, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := health(url))["status"] != status:
        assert time.monotonic() < deadline, f"/health stayed {state}"
        time.sleep(0.05)
    return state


def metric_samples(url: str) -> dict:
    return {(s.name, s.labels.get("node")): s.value for family in text_string_to_metric_families(
        httpx.get(f"{url}/metrics").text) for s in family.samples}


def test_four_streams_survive_a_killed_worker_which_then_comes_back(served):
    _, url, _ = served
    expected = concurrent_streams(url, STREAM_PROMPTS, STREAM_TOKENS)
    victim = expert_worker_pids()[0]
    degraded = {}

    def kill_and_watch() -> None:
        os.kill(victim, signal.SIGKILL)
        degraded.update(wait_for_health(url, "degraded", timeout_s=10))
    assert concurrent_streams(url, STREAM_PROMPTS, STREAM_TOKENS, kill_and_watch) == expected
    (node, outage), = degraded["down"].items()
    assert node in ("worker-1", "worker-2") and node in degraded["workers"]
    assert "head (from its file)" in outage["covered_by"] or not outage["covered_by"]
    # Ray restarts the process; while it loads its share again, requests are still answered in full.
    body = {"prompt": STREAM_PROMPTS[0], "max_tokens": STREAM_TOKENS, "temperature": 0}
    during = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert during.status_code == 200 and during.json()["choices"][0]["text"] == expected[0]
    back = wait_for_health(url, "ok")
    assert back["workers"] == {"worker-1": "ok", "worker-2": "ok"} and "down" not in back
    assert victim not in expert_worker_pids() and len(expert_worker_pids()) == 2
    samples = metric_samples(url)
    assert samples[("kimi_worker_failovers_total", node)] == 1 and samples[("kimi_worker_rejoins_total", node)] == 1
    assert samples[("kimi_fallback_expert_activations_total", None)] > 0
    assert samples[("kimi_degraded_seconds_total", None)] > 0
    # The planned placement again: the worker computes its own experts, the head's fallback nothing more.
    fallback, answered = samples[("kimi_fallback_expert_activations_total", None)], samples[
        ("kimi_expert_activations_total", node)]
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == expected[0]
    samples = metric_samples(url)
    assert samples[("kimi_fallback_expert_activations_total", None)] == fallback
    assert samples[("kimi_expert_activations_total", node)] > answered


def test_four_streams_survive_a_stopped_worker_and_it_rejoins_when_continued(served):
    _, url, _ = served
    expected = concurrent_streams(url, STREAM_PROMPTS, STREAM_TOKENS)
    victim = expert_worker_pids()[0]
    started = time.monotonic()
    try:
        got = concurrent_streams(url, STREAM_PROMPTS, STREAM_TOKENS, lambda: os.kill(victim, signal.SIGSTOP))
        assert got == expected
        assert time.monotonic() - started < 60
        state = wait_for_health(url, "degraded", timeout_s=1)
        (node, outage), = state["down"].items()
        assert "deadline" in outage["reason"] and outage["covered_by"] == ["head (from its file)"]
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_for_health(url, "ok", timeout_s=30)
    assert victim in expert_worker_pids()  # the same process, answering again


def test_a_long_prompt_survives_a_worker_lost_during_its_prefill(served):
    path, url, _ = served
    prompt = " ".join(["Spread every layer over the machines,"] * 40)  # a prompt no earlier request began with
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    victim = expert_worker_pids()[1]
    os.kill(victim, signal.SIGSTOP)  # it stops answering in the middle of the prompt's chunk
    try:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    finally:
        os.kill(victim, signal.SIGCONT)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] > 200 and usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert response.json()["choices"][0]["text"] == generate(path, prompt=prompt, max_tokens=8)
    wait_for_health(url, "ok", timeout_s=30)


def test_a_conversation_s_next_turn_reuses_its_prompt_on_the_head_through_a_lost_worker(served):
    """The KV cache lives on the head: with the experts on workers, and one of them killed between turns, the
    next turn computes only what it adds, and answers as a cold run of its whole prompt does."""
    path, url, _ = served
    first = httpx.post(f"{url}/v1/completions", json={"prompt": "Turn one: the head keeps the cache", "max_tokens": 8,
                                                      "temperature": 0}, timeout=120).json()
    second_prompt = "Turn one: the head keeps the cache" + first["choices"][0]["text"] + " and turn two goes on"
    fallback = metric_samples(url)[("kimi_fallback_expert_activations_total", None)]
    os.kill(expert_worker_pids()[0], signal.SIGKILL)
    second = httpx.post(f"{url}/v1/completions", json={"prompt": second_prompt, "max_tokens": 8, "temperature": 0},
                        timeout=120).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    assert second["choices"][0]["text"] == generate(path, prompt=second_prompt, max_tokens=8)
    assert metric_samples(url)[("kimi_fallback_expert_activations_total", None)] > fallback, "the head covered"
    wait_for_health(url, "ok")


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


def serve_on_console(path: Path, console: Path, *extra: str) -> tuple[subprocess.Popen, re.Match]:
    """`serve` on one process, its console written to `console`; returns it, once ready, and its ready line's
    match: [1] the address, [2] the paths it names."""
    with console.open("w") as out:
        process = start(cli("serve", str(path), "--port", "0", "--threads", "1", *extra),
                        stderr=out, stdout=subprocess.DEVNULL, env={**os.environ, "KIMI_API_KEY": ""})
    deadline = time.monotonic() + 120
    while not (ready := re.search(r"ready at (http://127\.0\.0\.1:\d+)/v1 \(serving (.*)\)", console.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"serve did not become ready:\n{console.read_text()}")
        time.sleep(0.2)
    return process, ready


def test_sigterm_mid_stream_ends_the_stream_with_the_reason_and_no_traceback(make_tiny, tmp_path):
    """A server stopped while it streams (a client still waiting, say an agent's next turn) tells the client
    why in the stream's last event and stops without a traceback on its console."""
    console = tmp_path / "console.txt"
    process, url = serve_on_console(make_tiny("Q4_K_M"), console)
    try:
        body = {"model": "tiny", "stream": True, "max_tokens": 2000, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Hello"}]}
        events = []
        with httpx.stream("POST", f"{url[1]}/v1/chat/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if len(events) == 3:
                        process.terminate()
        assert process.wait(timeout=30) == 0
        assert events[-1]["error"]["code"] == "shutting_down" and "shutting down" in events[-1]["error"]["message"]
        assert "Traceback" not in console.read_text() and "stopped (SIGTERM)" in console.read_text()
    finally:
        stop(process)


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


def test_serve_help_names_every_api():
    help_text = subprocess.run(cli("serve", "--help"), capture_output=True, text=True, check=True).stdout
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/models", "/v1/messages"):
        assert path in help_text, path


def test_what_a_served_file_says_about_itself(make_tiny, tmp_path):
    """The ready line names every path served, /v1/models the context (vLLM's max_model_len too), the file's
    quantization and size, a 404 the paths served; the access line shows each request's id."""
    path = make_tiny("Q4_K_M")
    console = tmp_path / "console.txt"
    process, ready = serve_on_console(path, console, "--context", "512")
    try:
        url, paths = ready[1], ready[2]
        assert paths == ("/v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages, /health "
                         "and /metrics")
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        assert card["max_model_len"] == card["context_length"] == 512
        assert card["quantization"] == "Q4_K_M" and card["file_size_bytes"] == path.stat().st_size
        missing = httpx.post(f"{url}/v1/chat/completion", json={}, timeout=30)
        assert missing.status_code == 404 and paths in missing.json()["error"]["message"]
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                           headers={"x-request-id": "agent-turn-7"}, timeout=60)
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "agent-turn-7"
        deadline = time.monotonic() + 30
        while "POST /v1/completions 200 in " not in console.read_text():
            assert time.monotonic() < deadline, console.read_text()
            time.sleep(0.1)
        assert "(request agent-turn-7): " in console.read_text()
    finally:
        stop(process)
