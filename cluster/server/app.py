"""The HTTP app: every protocol's routes over one service, the API key, errors in the shape of the protocol
whose path was asked for, request ids, access lines, /health and /metrics; and ApiServer, which runs it.

Protocols are modules with routes, their paths and their error shape (ApiProtocol); this module assembles
them, and the service below them never imports one.
"""
from __future__ import annotations

import asyncio
import errno
import re
import secrets
import socket
import threading
import time
from typing import Callable, Protocol

import uvicorn
from fastapi import APIRouter, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from cluster.server import anthropic_api, dashboard, openai_api, openai_responses
from cluster.server.errors import ApiError, validation_error
from cluster.server.service import Service
from cluster.server.speed_history import SpeedHistory

OPEN_PATHS = ("/health", "/metrics")  # open to monitoring without the API key, unless protect_metrics
# A client's own x-request-id is kept when it is printable and has no blanks (it goes into a header and the
# console); otherwise the request gets one of ours.
CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")


class ApiProtocol(Protocol):
    """What a protocol module gives the app: its routes, the paths they live under, and its error shape."""
    PATHS: tuple[str, ...]

    def routes(self, service: Service) -> APIRouter: ...

    def error_body(self, error: ApiError) -> dict: ...


# Adding a protocol is adding its module here. Paths outside every protocol's get the first one's errors.
PROTOCOLS: tuple[ApiProtocol, ...] = (openai_api, openai_responses, anthropic_api)


def paths_served(protocols: tuple[ApiProtocol, ...] = PROTOCOLS) -> str:
    """Every protocol's paths, /health and /metrics, in words: what the ready line and a 404 name."""
    paths = [path for protocol in protocols for path in protocol.PATHS] + list(OPEN_PATHS)
    return f"{', '.join(paths[:-1])} and {paths[-1]}"


def create_app(service: Service, protocols: tuple[ApiProtocol, ...] = PROTOCOLS) -> FastAPI:
    """The app serving every protocol's routes, /health, /metrics, and the dashboard and chat pages."""
    history = SpeedHistory(service.metrics.registry)
    app = FastAPI(title="kimi-cluster", description="OpenAI-compatible API for Kimi K2.x on a cluster",
                  docs_url=None, redoc_url=None, lifespan=dashboard.sampling(service, history))

    def error_response(http: HttpRequest, error: ApiError) -> JSONResponse:
        """In the shape of the protocol the path belongs to (the first one's for other paths)."""
        path = http.url.path
        protocol = next((p for p in protocols if path.startswith(p.PATHS)), protocols[0])
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return JSONResponse(protocol.error_body(error), status_code=error.status, headers=headers)

    @app.middleware("http")
    async def count_and_authorize(http: HttpRequest, call_next):
        started = time.perf_counter()
        endpoint = http.url.path
        sent_id = http.headers.get("x-request-id", "")
        http.state.request_id = sent_id if CLIENT_REQUEST_ID.fullmatch(sent_id) else f"req_{secrets.token_hex(12)}"
        left_open = dashboard.is_page(endpoint) or (not service.protect_metrics and endpoint in OPEN_PATHS)
        if service.api_key and not left_open and not _key_matches(http, service.api_key):
            response = error_response(http, ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                                          "<key>' or 'x-api-key: <key>'", code="invalid_api_key"))
        else:
            response = await call_next(http)
        response.headers["x-request-id"] = http.state.request_id
        if endpoint.startswith("/v1/"):
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            if service.access_log is not None:
                response = _log_when_done(service.access_log, http, response, started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(http: HttpRequest, error: ApiError):
        return error_response(http, error)

    @app.exception_handler(HTTPException)
    async def http_error(http: HttpRequest, error: HTTPException):
        if error.status_code == 404:  # a path no route has
            return error_response(http, ApiError(404, f"nothing is served at {http.url.path}; this server serves "
                                                      f"{paths_served(protocols)}", code="not_found"))
        return error_response(http, ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(http: HttpRequest, error: RequestValidationError):
        return error_response(http, validation_error(error.errors()))

    @app.get("/health")
    async def health():
        if service.load_error:
            return JSONResponse({"status": "error", "error": service.load_error}, status_code=503)
        if service.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        cluster = await asyncio.to_thread(service.cluster_status)
        workers, down = cluster.get("workers", {}), cluster.get("down", {})
        # Degraded still serves: lost workers' experts are computed elsewhere until they are back.
        ok = not down and all(state == "ok" for state in workers.values())
        body = {"status": "ok" if ok else "degraded", "workers": workers,
                "running": service.engine.num_running, "waiting": service.engine.num_waiting}
        if down:
            body["down"] = down
            if cluster.get("recovery_error"):
                body["recovery_error"] = cluster["recovery_error"]
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    for protocol in protocols:
        app.include_router(protocol.routes(service))
    dashboard.add_dashboard(app, service, history)
    return app


def _key_matches(http: HttpRequest, key: str) -> bool:
    """As a bearer token (OpenAI's clients) or in x-api-key (Anthropic's), compared in constant time."""
    bearer = secrets.compare_digest(http.headers.get("authorization", "").encode(), f"Bearer {key}".encode())
    header = secrets.compare_digest(http.headers.get("x-api-key", "").encode(), key.encode())
    return bearer or header


def _log_when_done(log: Callable[[str], None], http: HttpRequest, response: Response, started: float
                   ) -> Response:
    """Log one line for the request once its response is complete (a stream: once its last event is sent)."""
    def write() -> None:
        line = (f"{http.method} {http.url.path} {response.status_code} in {time.perf_counter() - started:.2f} s "
                f"(request {http.state.request_id})")
        generation = getattr(http.state, "generation", None)
        log(line if generation is None else f"{line}: {generation.summary()}")

    if not hasattr(response, "body_iterator"):  # whole, made here (a refused key): nothing left to send
        write()
        return response
    body = response.body_iterator  # what call_next gives streams, whole or not

    async def logged():
        try:
            async for chunk in body:
                yield chunk
        finally:
            write()
    response.body_iterator = logged()
    return response


# ---- running the server ----

class ApiServer:
    """uvicorn on a background thread, so the caller's thread can bring the model up meanwhile. The socket is
    bound here, before uvicorn starts, so that a port in use is one clear error rather than uvicorn's log."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000):
        self.socket = _listening_socket(host, port)
        config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="http",
                                        daemon=True)

    def start(self, timeout_s: float = 30) -> int:
        """Start serving; returns the port (useful with port 0)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the HTTP server did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self.socket.getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use (another server?); stop that program or "
                          "choose another port with --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host and --port") from None
    return sock
