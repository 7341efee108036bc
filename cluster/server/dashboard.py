"""The web pages `serve` ships: a live dashboard of the cluster at / and a chat page at /chat, static files
from the package (no build step, nothing fetched from the internet), and GET /status, the JSON they read.

The pages themselves hold no data and are served without the API key; /status and the API they call ask
for it like every other route, so a page without a key asks its user for one.
"""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from cluster.server.service import Service
from cluster.server.speed_history import SAMPLE_EVERY_S, SpeedHistory

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "dashboard.html", "/chat": "chat.html"}
STATIC_PREFIX = "/static/"
NOTHING_KNOWN = {"nodes": [], "placement": None, "heat": None, "events": []}  # before the cluster is planned


def is_page(path: str) -> bool:
    """Served without the API key: a page or its scripts and styles."""
    return path in PAGES or path.startswith(STATIC_PREFIX)


def add_dashboard(app: FastAPI, service: Service, history: SpeedHistory) -> None:
    app.include_router(routes(service, history))
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="static")


def routes(service: Service, history: SpeedHistory) -> APIRouter:
    router = APIRouter()
    for path, page in PAGES.items():
        router.add_api_route(path, _page(STATIC / page), methods=["GET"], include_in_schema=False)

    @router.get("/status")
    async def status():
        view = {**NOTHING_KNOWN, **await asyncio.to_thread(service.cluster_view)}
        samples = list(history.samples)
        for node in view["nodes"]:
            node["round_trip_ms"] = _latest_round_trip(samples, node["name"])
        return {"model": _model_card(service), "state": _serving_state(service, view),
                "error": service.load_error, **view, "speed": samples}
    return router


def sampling(service: Service, history: SpeedHistory):
    """The app's lifespan: a speed sample every few seconds once the model has loaded."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_sample_forever(service, history))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return lifespan


async def _sample_forever(service: Service, history: SpeedHistory) -> None:
    while True:
        await asyncio.sleep(SAMPLE_EVERY_S)
        if service.engine is not None:
            history.sample(service.engine)


def _page(path: Path):
    async def page():
        return FileResponse(path, headers={"Cache-Control": "no-cache"})
    return page


def _model_card(service: Service) -> dict:
    return {"name": service.model_name, "quantization": service.quantization, "file_bytes": service.file_bytes,
            "context": service.context_size}


def _serving_state(service: Service, view: dict) -> str:
    if service.load_error:
        return "error"
    if service.engine is None:
        return "loading"
    return "ok" if all(node["state"] == "ok" for node in view["nodes"]) else "degraded"


def _latest_round_trip(samples: list[dict], node: str) -> float | None:
    """Milliseconds per layer request to the node, averaged over the last sample that had any."""
    return next((s["round_trip_ms"][node] for s in reversed(samples) if node in s["round_trip_ms"]), None)
