"""The OpenAI-compatible API over real HTTP: the official `openai` client, 16 concurrent streams, bad
requests, disconnects, a full queue, health and Prometheus metrics. One server on the tiny model in this
process; tests/test_serve.py runs the `kimi-cluster serve` command with expert workers."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.server.app import ApiServer
from cluster.server.service import Service
from runtime.engine import Engine
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.tokenizer import Tokenizer

KEY = "test-key"
CONTEXT = 256
PROMPTS = [f"Request {i}: tell me about {topic}" for i, topic in
           enumerate(["memory", "experts", "routers", "caches", "GPUs", "Ray", "gRPC", "YaRN"] * 2)]


def start_server(model, tokenizer, api_key=KEY, access_log=None, context=CONTEXT, **engine_options) -> SimpleNamespace:
    service = Service("tiny", tokenizer, context, api_key=api_key, access_log=access_log)
    api = ApiServer(service, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{api.start()}"
    if model is not None:
        service.ready(Engine(model, context, **engine_options))
    return SimpleNamespace(url=url, service=service, api=api, model=model, tokenizer=tokenizer)


def stop_server(server) -> None:
    if server.service.engine is not None:
        server.service.engine.stop()
    server.api.stop()


@pytest.fixture(scope="module")
def parts(make_tiny):
    model_file = GGUFModelFile(make_tiny("Q4_K_M"))
    # Plain kernels: a sequence's tokens do not depend on its batch (see runtime/engine.py).
    return KimiModel(model_file, GgmlRunner(2), repack="none"), Tokenizer.from_metadata(model_file.metadata)


@pytest.fixture(scope="module")
def server(parts):
    server = start_server(*parts, max_sequences=16)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def solo_tokens(server, prompt: str, max_tokens: int) -> list[int]:
    engine = Engine(server.model, CONTEXT)
    tokens = server.tokenizer.encode(prompt, parse_special=True)
    return list(engine.generate(tokens, max_tokens, stop_tokens=server.tokenizer.eog_ids))


def visible_text(tokenizer, tokens) -> str:
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eog_ids])


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].max_model_len == models[0].context_length == CONTEXT  # vLLM's name for it too


def test_completion_equals_the_engine_and_counts_usage(server, client):
    tokens = solo_tokens(server, PROMPTS[0], 12)
    reply = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert reply.choices[0].text == visible_text(server.tokenizer, tokens)
    assert reply.choices[0].finish_reason == ("stop" if tokens[-1] in server.tokenizer.eog_ids else "length")
    assert reply.usage.prompt_tokens == len(server.tokenizer.encode(PROMPTS[0]))
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(tokens)


def test_streamed_chat_equals_the_whole_reply(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = server.tokenizer.apply_chat_template(messages)
    tokens = list(Engine(server.model, CONTEXT).generate(server.tokenizer.encode(prompt), 20,
                                                         stop_tokens=server.tokenizer.eog_ids))
    assert whole.choices[0].message.content == visible_text(server.tokenizer, tokens)


def test_sixteen_concurrent_streams_each_equal_their_solo_run(server, client):
    def stream(prompt: str) -> tuple[str, str]:
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True)
        parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks]
        return "".join(text for text, _ in parts), parts[-1][1]

    alone = [stream(p) for p in PROMPTS]  # one at a time: each runs alone in its steps
    rows, observe_metrics = [], server.service.engine.on_step
    server.service.engine.on_step = lambda count, seconds: rows.append(count)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(stream, PROMPTS))
    server.service.engine.on_step = observe_metrics
    assert together == alone
    assert all(finish in ("stop", "length") for _, finish in together)
    assert max(rows) >= 8  # the streams really shared steps


def test_stop_string_split_across_tokens_ends_the_text(server, client):
    full = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0).choices[0].text
    tokens = server.tokenizer.encode(full, parse_special=False)
    # A stop string that starts inside one token and ends inside a later one.
    cut = len(server.tokenizer.decode(tokens[:3]))
    stop = full[cut - 1: cut + 2]
    assert len(stop) == 3 and full.find(stop) < cut
    reply = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_logprobs(client):
    reply = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=5, temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy takes the best
        assert all(value <= 0 for value in top.values())
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)


def test_same_seed_same_sample(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=12, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text
    assert sample(11) == sample(11)
    assert len({sample(s) for s in range(4)}) > 1


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


GOOD = {"model": "tiny", "prompt": "hello", "max_tokens": 2}


@pytest.mark.parametrize("path, body, key, status, code, words", [
    ("/v1/completions", "{not json", KEY, 400, None, "not valid JSON"),
    ("/v1/completions", "[1, 2]", KEY, 400, None, "JSON object"),
    ("/v1/completions", {**GOOD, "prompt": "word " * 400}, KEY, 400, "context_length_exceeded",
     "context holds 256; shorten the prompt (or start the server with --context above"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, KEY, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**GOOD, "prompt": [1, 10**6]}, KEY, 400, None, "token ids must lie in"),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, KEY, 400, "invalid_value", "max_tokens"),
    ("/v1/completions", {**GOOD, "temperature": "hot"}, KEY, 400, "invalid_value", "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 7}, KEY, 400, "invalid_value", "temperature"),
    ("/v1/completions", {**GOOD, "n": 2}, KEY, 400, "invalid_value", "'n'"),
    ("/v1/completions", {"model": "tiny"}, KEY, 400, "missing_required_parameter", "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, KEY, 400, None, "one prompt per request"),
    ("/v1/completions", GOOD, "wrong-key", 401, "invalid_api_key", "API key"),
    ("/v1/completions", GOOD, None, 401, "invalid_api_key", "API key"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, KEY, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 400,
     "invalid_value", "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, KEY, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": None}]}, KEY, 400,
     "invalid_value", "a 'user' message needs 'content'"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "system", "content": None},
                                                            {"role": "user", "content": "hi"}]}, KEY, 400,
     "invalid_value", "a 'system' message needs 'content'"),
    ("/v1/completions", '{"model": "tiny", "prompt": "hello", "repetition_penalty": Infinity}', KEY, 400, None,
     "Infinity is not a JSON value"),
    ("/v1/completions", {**GOOD, "top_p": 0}, KEY, 400, "invalid_value", "invalid value for 'top_p'"),
    ("/v1/nothing-here", GOOD, KEY, 404, "not_found", "nothing is served at /v1/nothing-here; this server serves "
     "/v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages, /health and /metrics"),
    ("/v1/completions", {**GOOD, "echo": True}, KEY, 400, "unsupported_parameter", "'echo' is not supported"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 10}}, KEY, 400, "unsupported_parameter", "logit_bias"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                              "functions": [{"name": "f"}]}, KEY, 400, "unsupported_parameter",
     "'functions' is not supported"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, key, status, code, words):
    response = post(server, path, body, key)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and error["code"] == code and error["type"]
    assert post(server, "/v1/completions", GOOD).status_code == 200


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize("content, param, words", [
    ([IMAGE], "messages[0].content[0].type", "images are not supported yet"),
    ([{"type": "text", "text": "What is in this picture?"}, IMAGE], "messages[0].content[1].type",
     "images are not supported yet"),
    ([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}], "messages[0].content[0].type",
     "'input_audio' is not supported"),
])
def test_a_message_with_an_image_is_refused_not_answered_without_it(client, content, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2)
    body = error.value.body  # OpenAI's shape: the client unwraps {"error": {...}}
    assert body["param"] == param and words in body["message"] and body["type"] == "invalid_request_error", body
    text_only = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}]}])
    assert text_only.choices[0].finish_reason in ("length", "stop")


def test_unknown_parameters_are_ignored(server):
    response = post(server, "/v1/completions", {**GOOD, "cache_prompt": True, "n_probs": 3, "echo": False,
                                                "logit_bias": {}})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"


def test_any_model_name_is_the_served_model_unless_strict(parts, server):
    """Coding agents send names of their own (claude-sonnet-4-5, gpt-5-codex); llama-server answers them all."""
    reply = post(server, "/v1/completions", {**GOOD, "model": "gpt-4"})
    assert reply.status_code == 200 and reply.json()["model"] == "tiny"
    strict = start_server(*parts)
    strict.service.strict_model_name = True
    try:
        refused = post(strict, "/v1/completions", {**GOOD, "model": "gpt-4"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert "'gpt-4' does not exist" in refused.json()["error"]["message"]
        assert post(strict, "/v1/completions", GOOD).status_code == 200
    finally:
        stop_server(strict)


def test_max_tokens_beyond_the_context_get_the_rest_of_it(server):
    """As llama-server does: a prompt that fits runs, and writes until the context is full at most."""
    prompt_tokens = len(server.tokenizer.encode(GOOD["prompt"], parse_special=True))
    reply = post(server, "/v1/completions", {**GOOD, "max_tokens": 10_000, "ignore_eos": True}).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == CONTEXT - prompt_tokens


def test_ignore_eos_keeps_generating_past_end_of_generation_tokens(server):
    body = {**GOOD, "max_tokens": 100, "temperature": 2.0}
    for seed in range(40):  # near-flat sampling: some seed draws an end-of-generation token early
        ended = post(server, "/v1/completions", {**body, "seed": seed}).json()
        if ended["choices"][0]["finish_reason"] == "stop":
            break
    else:
        pytest.fail("no seed drew an end-of-generation token")
    kept_on = post(server, "/v1/completions", {**body, "seed": seed, "ignore_eos": True}).json()
    assert kept_on["choices"][0]["finish_reason"] == "length" and kept_on["usage"]["completion_tokens"] == 100
    assert kept_on["choices"][0]["text"].startswith(ended["choices"][0]["text"])


def test_a_client_that_goes_away_frees_its_sequence(parts):
    # A context long enough, and end-of-generation tokens ignored, so that the sequence cannot finish by
    # itself while the test looks at it (200 tokens of the tiny model took less than one scrape once, and
    # a sampled <|im_end|> ended one early).
    server = start_server(*parts, context=4096)
    try:
        engine = server.service.engine
        with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={**GOOD, "max_tokens": 4000, "stream": True, "ignore_eos": True},
                          timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.running
            assert metric_values(server)["kimi_running_sequences"] >= 1
        deadline = time.monotonic() + 5
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.running and not engine.waiting
        # The gauges are read at the scrape: no step need run after the sequence left for them to say so.
        assert httpx.get(f"{server.url}/health").json()["running"] == 0
        assert metric_values(server)["kimi_running_sequences"] == 0
    finally:
        stop_server(server)


LONG_PROMPT = "word " * 1500  # 3,000 tokens


def long_prefill_server(parts, lines: list[str]):
    """A prompt of thousands of tokens prefilled two rows a step: seconds before its first token."""
    server = start_server(*parts, context=4096, access_log=lines.append, max_sequences=1, max_step_tokens=2)
    server.service.heartbeat_s = 0.3
    server.rows = []
    server.service.engine.on_step = lambda rows, seconds: server.rows.append(rows)
    return server


@pytest.mark.parametrize("path, body, keep_alive", [
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 5, "stream": True}, ": keep-alive"),
    ("/v1/messages", {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 5, "stream": True},
     "event: ping"),
])
def test_a_long_prefill_keeps_the_stream_alive_and_stops_when_the_client_leaves(parts, path, body, keep_alive):
    lines = []
    server = long_prefill_server(parts, lines)
    try:
        prompt_tokens = len(server.tokenizer.encode(LONG_PROMPT))
        opened = time.monotonic()
        with httpx.stream("POST", f"{server.url}{path}", headers={"x-api-key": KEY}, json={"model": "tiny", **body},
                          timeout=60) as response:
            assert response.status_code == 200
            received = []
            for line in response.iter_lines():
                received.append(line)
                if received.count(keep_alive) == 2:
                    break
            held = time.monotonic() - opened
        assert not any("content_block" in line or "text_completion" in line for line in received)  # no token yet
        deadline = time.monotonic() + 10
        while server.service.engine.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.service.engine.running  # cancelled between prefill chunks ...
        assert sum(server.rows) < prompt_tokens  # ... long before the prompt was done
        wait_for_lines(lines, 1)
        seconds = float(lines[-1].split(" in ")[1].split(" s")[0])
        assert lines[-1].startswith(f"POST {path} 200 in ") and seconds >= held - 0.1, (lines, held)
    finally:
        stop_server(server)


def test_a_full_queue_answers_503_and_serves_again(parts):
    server = start_server(*parts, max_sequences=1, max_waiting=1)
    try:
        body = {**GOOD, "max_tokens": 60}
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: post(server, "/v1/completions", body), range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert 200 in statuses and 503 in statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"]
        assert post(server, "/v1/completions", GOOD).status_code == 200
    finally:
        stop_server(server)


def wait_for_lines(lines: list[str], count: int) -> None:
    """The line is written once the response's last byte is sent, which the client may see first."""
    deadline = time.monotonic() + 5
    while len(lines) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_one_access_line_per_finished_request(parts):
    lines = []
    server = start_server(*parts, access_log=lines.append)
    try:
        post(server, "/v1/completions", {**GOOD, "max_tokens": 5, "temperature": 0})
        wait_for_lines(lines, 1)
        assert lines[-1].startswith("POST /v1/completions 200 in ")
        assert "prompt + 5 generated tokens, first after " in lines[-1] and lines[-1].endswith("tokens/s")
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
                          timeout=60) as response:
            body = [line for line in response.iter_lines() if line]
            assert body[-1] == "data: [DONE]"
        wait_for_lines(lines, 2)
        assert len(lines) == 2 and " + 3 generated tokens" in lines[-1]
        post(server, "/v1/completions", {**GOOD, "temperature": 9})
        wait_for_lines(lines, 3)
        assert lines[-1].startswith("POST /v1/completions 400 in ") and "generated" not in lines[-1]
        refused = post(server, "/v1/completions", GOOD, key="wrong")  # answered by the key check itself
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        wait_for_lines(lines, 4)
        assert lines[-1].startswith("POST /v1/completions 401 in ")
        time.sleep(0.2)  # and no second line for any of them
        assert len(lines) == 4
    finally:
        stop_server(server)


def test_every_response_carries_a_request_id_which_its_access_line_shows(parts):
    """A client's own x-request-id comes back, so that its logs and the server's can be matched; otherwise the
    server makes one."""
    lines = []
    server = start_server(*parts, access_log=lines.append)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"x-request-id": "agent-turn-7"})
        assert reply.headers["x-request-id"] == "agent-turn-7" and reply.parse().choices
        wait_for_lines(lines, 1)
        assert lines[-1].startswith("POST /v1/chat/completions 200 in ") and "(request agent-turn-7): " in lines[-1]
        made = [post(server, "/v1/completions", GOOD).headers["x-request-id"] for _ in range(2)]
        assert made[0] != made[1] and all(re.fullmatch(r"req_[0-9a-f]{24}", m) for m in made)
        wait_for_lines(lines, 3)
        assert f"(request {made[1]})" in lines[-1]
        blank = httpx.post(f"{server.url}/v1/completions", json=GOOD,
                           headers={"Authorization": f"Bearer {KEY}", "x-request-id": "two words"}, timeout=60)
        assert blank.headers["x-request-id"].startswith("req_"), "a value the console cannot show plainly is replaced"
        refused = post(server, "/v1/completions", GOOD, key="wrong")
        assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req_")
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "x-request-id": "stream-1"},
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}) as s:
            assert s.headers["x-request-id"] == "stream-1" and list(s.iter_lines())
        wait_for_lines(lines, 6)
        assert "(request stream-1): " in lines[-1]
        assert httpx.get(f"{server.url}/health").headers["x-request-id"].startswith("req_")
    finally:
        stop_server(server)


def test_health_says_loading_until_the_model_is_ready(parts):
    model, tokenizer = parts
    server = start_server(None, tokenizer, api_key=None)
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        refused = post(server, "/v1/completions", GOOD, key=None)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
        assert httpx.get(f"{server.url}/status").json()["state"] == "loading"  # the dashboard's
        server.service.ready(Engine(model, CONTEXT))
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        status = httpx.get(f"{server.url}/status").json()
        assert status["state"] == "ok" and status["model"]["name"] == "tiny"
        assert post(server, "/v1/completions", GOOD, key=None).status_code == 200
    finally:
        stop_server(server)


def metric_values(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_parse_and_move(server, client):
    before = metric_values(server)
    client.completions.create(model="tiny", prompt=PROMPTS[5], max_tokens=6, temperature=0)
    after = metric_values(server)
    ok = "kimi_requests_total{endpoint=/v1/completions,status=200}"
    assert after[ok] == before.get(ok, 0) + 1
    assert after["kimi_generated_tokens_total"] >= before["kimi_generated_tokens_total"] + 1
    assert after["kimi_prompt_tokens_total"] > before["kimi_prompt_tokens_total"]
    assert after["kimi_time_to_first_token_seconds_count"] == before["kimi_time_to_first_token_seconds_count"] + 1
    assert after["kimi_inter_token_latency_seconds_count"] > before["kimi_inter_token_latency_seconds_count"]
    assert after["kimi_step_rows_count"] > before["kimi_step_rows_count"]


def test_reasoning_comes_back_as_reasoning_content(make_tiny, tmp_path):
    """A thinking template whose generation prompt opens <think>: what the model writes up to </think> is
    reasoning_content, the rest is content, streamed or not."""
    from gguf import GGUFValueType

    from runtime.synthetic.demo_vocab import KIMI_K2_THINKING_TEMPLATE
    from tests.gguf_tools import rewrite_gguf
    template = KIMI_K2_THINKING_TEMPLATE + "{% if add_generation_prompt %}<think>{% endif %}"
    path = rewrite_gguf(make_tiny("Q4_K_M"), tmp_path / "thinking.gguf",
                        set_keys={"tokenizer.chat_template": (template, GGUFValueType.STRING)})
    model_file = GGUFModelFile(path)
    tokenizer = Tokenizer.from_metadata(model_file.metadata)
    model = KimiModel(model_file, GgmlRunner(2), repack="none")
    messages = [{"role": "user", "content": "Why pool memory?"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert tokenizer.decode(prompt[-1:]) == "<think>"
    tokens = [t for t in Engine(model, CONTEXT).generate(prompt, 24, stop_tokens=tokenizer.eog_ids)
              if t not in tokenizer.eog_ids]
    close = tokenizer.encode("</think>")[0]
    cut = tokens.index(close) if close in tokens else len(tokens)
    expected = (tokenizer.decode(tokens[:cut]), tokenizer.decode(tokens[cut + 1:]))
    assert expected[0]

    server = start_server(model, tokenizer, api_key=None)
    try:
        body = {"messages": messages, "max_tokens": 24, "temperature": 0}
        message = post(server, "/v1/chat/completions", body, key=None).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == expected
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as response:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in response.iter_lines()
                      if line.startswith("data: {")]
        assert ("".join(d.get("reasoning_content", "") for d in deltas),
                "".join(d.get("content") or "" for d in deltas)) == expected
    finally:
        stop_server(server)
