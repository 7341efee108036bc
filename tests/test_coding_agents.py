"""Real coding agents against `kimi-cluster serve`, with the README's settings ("Coding agents"): Claude Code,
Codex CLI and opencode at the versions tests/agents/package.json pins (`npm install --prefix tests/agents`, as
.ci/run does), and OpenAI's Agents SDK at the version pyproject.toml pins. Each runs as a user runs it,
non-interactively, with its own default prompt and tools, against a scripted model
(runtime/synthetic/scripted_model.py) that calls the client's own shell or function tool. The test checks that
the tool ran, that the client's next request carried the tool's result, and that the server answered that
request to its end, computing only what the turn added (prompt reuse). A pass-through proxy between client
and server (tests/recording_proxy.py) shows what each request carried.

The scripted model follows the last two tokens of its prompt, and every turn's prompt ends alike (the
assistant's header), so it calls the tool again on the next turn: each client is stopped by its own turn
limit, or by the test once that answer has reached it.
"""
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
import pytest

from runtime.synthetic.demo_vocab import demo_tokenizer_metadata
from runtime.synthetic.scripted_model import spell, write_scripted_model
from runtime.tokenizer import Tokenizer
from tests.recording_proxy import Exchange, RecordingProxy
from tests.scripted_models import QUESTION, write_scripted_models
from tests.test_serve import start, stop

pytestmark = pytest.mark.slow

AGENTS = Path(__file__).parent / "agents" / "node_modules" / ".bin"
KEY = "agent-test-key"
TASK = "Create a file named ran."
COMMAND = "touch ran"  # the command every scripted model asks the client's shell to run


def agent(name: str) -> str:
    """The pinned client's executable; a clear failure if the npm packages are not installed."""
    path = AGENTS / name
    assert path.exists(), f"{name} is not installed: run `npm install --prefix tests/agents` (see the README)"
    return str(path)


def calling_model(folder: Path, tool: str, arguments: dict) -> Path:
    """A scripted model whose reply to any chat is one call of `tool` with `arguments`."""
    tokenizer = Tokenizer.from_metadata(demo_tokenizer_metadata("instruct"))

    def token(marker: str) -> int:
        return tokenizer.encode(marker, parse_special=True, add_bos=False)[0]
    prompt_end = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": TASK}]), True)[-2:]
    script = [*prompt_end, token("<|tool_calls_section_begin|>"), token("<|tool_call_begin|>"), f"functions.{tool}:0",
              token("<|tool_call_argument_begin|>"), json.dumps(arguments), token("<|tool_call_end|>"),
              token("<|tool_calls_section_end|>"), token("<|im_end|>")]
    return write_scripted_model(folder / f"{tool}.gguf", spell([script], tokenizer))


class Served:
    """`kimi-cluster serve` on a model, its console in a file, behind a recording proxy."""

    def __init__(self, model: Path, folder: Path, context: int):
        self.console = folder / "serve-console.txt"
        with self.console.open("w") as console:
            self.process = start([sys.executable, "-m", "cluster.cli", "serve", str(model), "--port", "0",
                                  "--context", str(context), "--max-sequences", "2"],
                                 stdout=console, stderr=subprocess.STDOUT, env={**os.environ, "KIMI_API_KEY": KEY})
        self.url = self._wait_until_ready()
        self.proxy = RecordingProxy(self.url).__enter__()

    def _wait_until_ready(self, timeout_s: float = 180) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited:\n{self.console.read_text()[-3000:]}"
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", self.console.read_text())
            if found and httpx.get(f"{found[1]}/health", timeout=30).status_code == 200:
                return found[1]
            time.sleep(0.5)
        raise AssertionError(f"serve not ready in {timeout_s} s:\n{self.console.read_text()[-3000:]}")

    def close(self) -> None:
        self.proxy.__exit__(None, None, None)
        stop(self.process)


@pytest.fixture
def serve(tmp_path):
    started: list[Served] = []

    def serve(model: Path, context: int) -> Served:
        started.append(Served(model, tmp_path, context))
        return started[-1]
    yield serve
    for served in started:
        served.close()


def client_home(tmp_path: Path) -> tuple[Path, Path]:
    """An empty HOME and a working folder for one client run."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def run_client(command: list[str], work: Path, env: dict[str, str], proxy: RecordingProxy, path: str,
               timeout_s: float) -> str:
    """Run a client until it ends or until the server has answered two of its turns (requests to `path` that
    declare tools) to their end, then stop it; returns what it printed."""
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TERM": "dumb"}
    log = work.parent / f"{Path(command[0]).name}-output.txt"
    with log.open("w") as output:
        client = subprocess.Popen(command, cwd=work, env={**base, **env}, stdout=output, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while client.poll() is None and sum(e.done for e in turns(proxy, path)) < 2:
                assert time.monotonic() < deadline, f"{command[0]}: two turns not answered in {timeout_s} s"
                time.sleep(0.5)
        finally:
            if client.poll() is None:
                os.killpg(client.pid, signal.SIGTERM)
                try:
                    client.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(client.pid, signal.SIGKILL)
                    client.wait()
    return log.read_text()


def turns(proxy: RecordingProxy, path: str) -> list[Exchange]:
    """The client's agent turns: its requests that declare tools (not, say, a title for the session)."""
    return [e for e in proxy.posts(path) if e.body and e.body.get("tools")]


def sse_events(answer: bytes) -> list[dict]:
    """The JSON events of a server-sent-event stream (keep-alives and [DONE] left out)."""
    return [json.loads(line[6:]) for line in answer.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def assert_answered_to_the_end(turn: Exchange, last_event: str) -> None:
    assert turn.status == 200 and turn.done, (turn.status, turn.answer[-500:])
    assert sse_events(turn.answer)[-1]["type"] == last_event, turn.answer[-500:]


def assert_reused(cached: int, previous_prompt: int) -> None:
    """The next turn resends the conversation: prompt reuse must spare at least all of the turn before's prompt
    (its last token was computed again then, for its logits)."""
    print(f"next turn: {cached} prompt tokens reused, the turn before had {previous_prompt}")
    assert cached >= previous_prompt - 1, f"the next turn reused {cached} tokens of the {previous_prompt} before"


# ---- Claude Code: Anthropic's Messages API, its default prompt (about 60K tokens here) and tools ----

CLAUDE_CONTEXT = 80_000


def test_claude_code_runs_its_bash_tool_and_sends_the_result_back(tmp_path, serve):
    served = serve(calling_model(tmp_path, "Bash", {"command": COMMAND}), CLAUDE_CONTEXT)
    home, work = client_home(tmp_path)
    env = {"HOME": str(home), "ANTHROPIC_BASE_URL": served.proxy.url, "ANTHROPIC_API_KEY": KEY,
           "API_TIMEOUT_MS": "3600000", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    said = run_client([agent("claude"), "-p", TASK, "--model", "claude-sonnet-4-5", "--allowedTools", "Bash",
                       "--max-turns", "2", "--output-format", "json"], work, env, served.proxy, "/v1/messages",
                      timeout_s=1800)
    assert (work / "ran").exists(), f"Claude Code did not run its Bash tool:\n{said[-3000:]}"
    first, second = turns(served.proxy, "/v1/messages")[:2]
    assert_answered_to_the_end(first, "message_stop")
    (call,) = [e["content_block"] for e in sse_events(first.answer) if e["type"] == "content_block_start"
               and e["content_block"]["type"] == "tool_use"]
    assert (call["name"], call["input"]) in [("Bash", {}), ("Bash", {"command": COMMAND})]
    results = [block for message in second.body["messages"] if isinstance(message["content"], list)
               for block in message["content"] if block.get("type") == "tool_result"]
    assert [r["tool_use_id"] for r in results] == [call["id"]] and not results[0].get("is_error"), results
    assert_answered_to_the_end(second, "message_stop")
    assert json.loads(said.strip().splitlines()[-1])["num_turns"] >= 2, said[-2000:]
    before, usage = ([e["usage"] for e in sse_events(turn.answer) if e["type"] == "message_delta"][-1]
                     for turn in (first, second))
    assert_reused(usage["cache_read_input_tokens"], before["cache_read_input_tokens"] + before["input_tokens"])


# ---- Codex CLI: the Responses API, its exec_command tool ----

CODEX_CONFIG = """\
model = "kimi-k2"
model_provider = "kimi"

[model_providers.kimi]
name = "kimi-cluster"
base_url = "{url}/v1"
env_key = "KIMI_API_KEY"
wire_api = "responses"
"""


def test_codex_runs_its_shell_tool_and_sends_the_result_back(tmp_path, serve):
    served = serve(calling_model(tmp_path, "exec_command", {"cmd": COMMAND}), 32_768)
    home, work = client_home(tmp_path)
    (home / ".codex").mkdir()
    (home / ".codex" / "config.toml").write_text(CODEX_CONFIG.format(url=served.proxy.url))
    env = {"HOME": str(home), "KIMI_API_KEY": KEY}
    said = run_client([agent("codex"), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", TASK],
                      work, env, served.proxy, "/v1/responses", timeout_s=900)
    assert (work / "ran").exists(), f"Codex did not run its exec_command tool:\n{said[-3000:]}"
    first, second = turns(served.proxy, "/v1/responses")[:2]
    assert_answered_to_the_end(first, "response.completed")
    (call,) = [e["item"] for e in sse_events(first.answer) if e["type"] == "response.output_item.done"
               and e["item"]["type"] == "function_call"]
    assert (call["name"], json.loads(call["arguments"])) == ("exec_command", {"cmd": COMMAND})
    outputs = [item for item in second.body["input"] if item.get("type") == "function_call_output"]
    assert [o["call_id"] for o in outputs] == [call["call_id"]], outputs
    assert_answered_to_the_end(second, "response.completed")
    before, usage = (sse_events(turn.answer)[-1]["response"]["usage"] for turn in (first, second))
    assert_reused(usage["input_tokens_details"]["cached_tokens"], before["input_tokens"])


# ---- opencode: chat completions through the AI SDK's OpenAI-compatible provider, its bash tool ----

def opencode_config(url: str) -> dict:
    return {"$schema": "https://opencode.ai/config.json", "model": "kimi/kimi-k2",
            "provider": {"kimi": {"npm": "@ai-sdk/openai-compatible", "name": "kimi-cluster",
                                  "options": {"baseURL": f"{url}/v1", "apiKey": "{env:KIMI_API_KEY}"},
                                  "models": {"kimi-k2": {"name": "Kimi K2"}}}}}


def test_opencode_runs_its_bash_tool_and_sends_the_result_back(tmp_path, serve):
    served = serve(calling_model(tmp_path, "bash", {"command": COMMAND}), 32_768)
    home, work = client_home(tmp_path)
    (work / "opencode.json").write_text(json.dumps(opencode_config(served.proxy.url)))
    env = {"HOME": str(home), "KIMI_API_KEY": KEY}
    said = run_client([agent("opencode"), "run", TASK], work, env, served.proxy, "/v1/chat/completions",
                      timeout_s=900)
    assert (work / "ran").exists(), f"opencode did not run its bash tool:\n{said[-3000:]}"
    first, second = turns(served.proxy, "/v1/chat/completions")[:2]
    assert first.status == 200 and first.done and first.answer.rstrip().endswith(b"data: [DONE]")
    calls = [c for e in sse_events(first.answer) for choice in e["choices"] for c in
             choice["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "bash"
    assert json.loads("".join(c["function"].get("arguments") or "" for c in calls)) == {"command": COMMAND}
    results = [m for m in second.body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == [calls[0]["id"]], results
    assert second.status == 200 and second.done and second.answer.rstrip().endswith(b"data: [DONE]")
    before, usage = ([e["usage"] for e in sse_events(turn.answer) if e.get("usage")][-1] for turn in (first, second))
    assert_reused(usage["prompt_tokens_details"]["cached_tokens"], before["prompt_tokens"])


# ---- OpenAI's Agents SDK: the Responses API, strict function tools ----

def test_the_agents_sdk_runs_its_strict_function_tools_and_sends_the_results_back(tmp_path, serve):
    import agents
    from openai import AsyncOpenAI

    served = serve(write_scripted_models(tmp_path)["caller"], 4096)
    ran: list[tuple[str, str]] = []

    @agents.function_tool  # strict by default: the server holds the arguments to the schema
    def get_weather(city: str) -> str:
        ran.append(("get_weather", city))
        return "18 C, clear"

    @agents.function_tool
    def get_time(zone: str) -> str:
        ran.append(("get_time", zone))
        return "12:00"
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel("kimi-k2", AsyncOpenAI(base_url=f"{served.proxy.url}/v1", api_key=KEY))
    assistant = agents.Agent(name="weather", instructions="Answer with the tools.", tools=[get_weather, get_time],
                             model=model)
    with pytest.raises(agents.MaxTurnsExceeded):  # the scripted model calls again on every turn
        agents.Runner.run_sync(assistant, QUESTION, max_turns=2)
    assert ran[:2] == [("get_weather", "Paris"), ("get_time", "UTC")]
    first, second = turns(served.proxy, "/v1/responses")[:2]
    assert all(tool["strict"] for tool in first.body["tools"])
    calls = [item for item in json.loads(first.answer)["output"] if item["type"] == "function_call"]
    outputs = [item for item in second.body["input"] if item.get("type") == "function_call_output"]
    assert [o["call_id"] for o in outputs] == [c["call_id"] for c in calls] and len(calls) == 2
    assert second.status == 200 and second.done and json.loads(second.answer)["status"] == "completed"
    before, usage = (json.loads(turn.answer)["usage"] for turn in (first, second))
    assert_reused(usage["input_tokens_details"]["cached_tokens"], before["input_tokens"])
