"""A small client of our own API (standard library only), for `kimi-cluster chat` and `kimi-cluster demo`."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator


class ApiClientError(RuntimeError):
    pass


def _open(url: str, body: dict | None, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise ApiClientError(f"{url} answered {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise ApiClientError(f"cannot reach {url}: {e.reason}; is `kimi-cluster serve` running there?") from None


def wait_until_ready(base_url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with _open(f"{base_url}/health", None, None, 5) as response:
                if json.loads(response.read()).get("status") in ("ok", "degraded"):  # degraded serves too
                    return
            last = "its /health says it is not serving yet"
        except ApiClientError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise ApiClientError(f"{base_url} did not become ready within {timeout_s:g} s: {last}")
        time.sleep(0.2)


def stream_chat(base_url: str, messages: list[dict[str, str]], api_key: str | None = None,
                **params: Any) -> Iterator[dict]:
    """Yields each streamed chunk's choice (with its `delta`), then the usage chunk."""
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}, **params}
    with _open(f"{base_url}/v1/chat/completions", body, api_key, timeout=3600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                raise ApiClientError(chunk["error"]["message"])
            if chunk.get("usage"):
                yield {"usage": chunk["usage"]}
            for choice in chunk["choices"]:
                yield choice
