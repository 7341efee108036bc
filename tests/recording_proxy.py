"""A pass-through HTTP proxy that keeps what went through it: tests of real clients (coding agents) see each
request a client sent and whether the server's answer reached it whole, without touching either side.
Streams pass chunk by chunk, as they come, so a client sees the server's pace (keep-alives included)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "host", "content-length"}


@dataclass
class Exchange:
    method: str
    path: str
    body: dict | None  # the request's JSON
    status: int = 0
    answer: bytes = b""  # the response body as it reached the client
    done: bool = False  # the response was passed on to its end


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client stopped in the middle of a request (as the tests stop agents) is no error here


class RecordingProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to `upstream`; `.exchanges` in arrival order."""

    def __init__(self, upstream: str):
        self.exchanges: list[Exchange] = []
        self.upstream = httpx.Client(base_url=upstream, timeout=httpx.Timeout(None, connect=10))
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.upstream.close()

    def posts(self, path: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == "POST" and e.path.split("?")[0] == path]

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward()

            def _forward(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                exchange = Exchange(self.command, self.path, body)
                proxy.exchanges.append(exchange)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    with proxy.upstream.stream(self.command, self.path, content=raw, headers=headers) as reply:
                        exchange.status = reply.status_code
                        self.send_response(reply.status_code)
                        for key, value in reply.headers.items():
                            if key.lower() not in HOP_BY_HOP and key.lower() != "content-encoding":
                                self.send_header(key, value)
                        self.send_header("transfer-encoding", "chunked")
                        self.end_headers()
                        for chunk in reply.iter_bytes():
                            exchange.answer += chunk
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                        exchange.done = True
                except (httpx.HTTPError, OSError):
                    self.close_connection = True  # the client or the server went away: recorded as not done

            def log_message(self, *args):
                pass

        return Handler
