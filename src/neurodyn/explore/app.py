"""The explorer's web application (FastAPI): one static page and two JSON endpoints.

``GET /``                 the page (``static/index.html``; its script and style are package data, nothing remote)
``GET /api/info``         where the models came from, the limits and ranges the endpoints accept
``POST /api/rings``       ``{"t": 0.5, "models": ["node", "anode"]}`` -> per model: points at ``t``, linear accuracy
``POST /api/latent``      ``{"points": [{"t": 1.0, "x": 1.2}, ...]}`` -> posterior mean and band on a grid

Requests are validated (pydantic) before any work: malformed JSON, a wrong type, a missing or unknown field, too
many points, a time or value out of range and NaN / infinity all get a 4xx answer ``{"error": "...", "detail":
[...]}`` naming the problem. The models run one request at a time (a lock), on one torch thread (set in each
request's worker thread: the OpenMP thread count is per thread, and a worker left at the default ran the prior's
decode 10-100 times slower on a loaded 2-core machine).
"""

from __future__ import annotations

import math
import threading
from importlib import resources
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InputError, SolveFailure
from .models import RING_MODELS, ExploreModels, latent_posterior, rings_state

MAX_POINTS = 50  # the server round trip at 50 points: ~100 ms on a loaded 2-core machine (100 points: ~170 ms)
VALUE_RANGE = (-5.0, 5.0)
GRID_POINTS = 101
N_SAMPLES = 32

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class RingsRequest(BaseModel):
    """Body of ``POST /api/rings``: the time ``t`` in [0, 1] and the models to show (default both)."""

    model_config = ConfigDict(extra="forbid")
    t: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    models: Annotated[list[Literal["node", "anode"]], Field(min_length=1, max_length=2)] = list(RING_MODELS)


class Observation(BaseModel):
    """One observation ``(t, x)`` of the series."""

    model_config = ConfigDict(extra="forbid")
    t: FiniteFloat
    x: FiniteFloat


class LatentRequest(BaseModel):
    """Body of ``POST /api/latent``: at most ``MAX_POINTS`` observations, any order."""

    model_config = ConfigDict(extra="forbid")
    points: Annotated[list[Observation], Field(max_length=MAX_POINTS)]


def _message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def create_app(models: ExploreModels) -> FastAPI:
    """The application serving ``models`` (see :func:`neurodyn.explore.load_or_train`).

    >>> from fastapi.testclient import TestClient  # doctest: +SKIP
    >>> client = TestClient(create_app(load_or_train()))  # doctest: +SKIP
    >>> client.post("/api/rings", json={"t": 2}).status_code  # doctest: +SKIP
    422
    """
    app = FastAPI(title="neurodyn explore", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    t_max = models.t_max
    grid = torch.linspace(0.0, t_max, GRID_POINTS)
    static = resources.files("neurodyn.explore") / "static"

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        broken = [e for e in exc.errors() if e.get("type") == "json_invalid"]
        if broken:
            at = broken[0].get("loc", ("body", "?"))[-1]
            why = (broken[0].get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse(status_code=400, content={
                "error": f"malformed JSON in the request body at character {at}: {why}", "detail": errors})
        return JSONResponse(status_code=422, content={"error": f"invalid request: {_message(errors)}",
                                                      "detail": errors})

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": f"invalid request: {exc}", "detail": []})

    @app.exception_handler(SolveFailure)
    async def _failed(request: Request, exc: SolveFailure) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": f"the model's solve failed for these inputs: "
                                                               f"{' '.join(str(exc).split())}", "detail": []})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"source": models.source, "train_seconds": models.train_seconds, "max_points": MAX_POINTS,
                "t_range": [0.0, t_max], "x_range": list(VALUE_RANGE), "rings_t_range": [0.0, 1.0],
                "models": {n: {"state_dim": int(m.basis.shape[0]), "extent": m.extent}
                           for n, m in models.rings.items()},
                "labels": models.y_display.tolist(), "n_samples": N_SAMPLES}

    @app.post("/api/rings")
    def rings(req: RingsRequest) -> dict[str, Any]:
        with lock:
            torch.set_num_threads(1)  # per worker thread: OpenMP's count is per thread (measured 10-100x slower)
            return {"t": req.t, "models": {name: rings_state(models, name, req.t) for name in req.models}}

    @app.post("/api/latent", response_model=None)
    def latent(req: LatentRequest) -> JSONResponse | dict[str, Any]:
        bad = [f"points.{i}: t={p.t:g} is outside [0, {t_max:g}]" for i, p in enumerate(req.points)
               if not 0.0 <= p.t <= t_max]
        bad += [f"points.{i}: x={p.x:g} is outside [{VALUE_RANGE[0]:g}, {VALUE_RANGE[1]:g}]"
                for i, p in enumerate(req.points) if not VALUE_RANGE[0] <= p.x <= VALUE_RANGE[1]]
        if bad:
            return JSONResponse(status_code=422, content={"error": "invalid request: " + "; ".join(bad),
                                                          "detail": bad})
        pts = sorted((p.t, p.x) for p in req.points)
        times = torch.tensor([p[0] for p in pts], dtype=grid.dtype)
        values = torch.tensor([p[1] for p in pts], dtype=grid.dtype)
        with lock:
            torch.set_num_threads(1)
            post = latent_posterior(models.latent, times, values, grid, n_samples=N_SAMPLES)
        out = {k: post[k].tolist() for k in ("mean", "lower", "upper")}
        if not all(math.isfinite(v) for k in ("mean", "lower", "upper") for v in out[k]):
            return JSONResponse(status_code=422, content={"error": "the model gave a non-finite posterior for "
                                                                   "these points; remove some", "detail": []})
        out.update(grid=grid.tolist(), samples=post["samples"][:5].tolist(), n_points=len(pts))
        return out

    return app


def serve(models: ExploreModels, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the application with uvicorn until interrupted (one torch thread: the models are tiny)."""
    import uvicorn

    torch.set_num_threads(1)
    uvicorn.run(create_app(models), host=host, port=port, log_level=log_level)
