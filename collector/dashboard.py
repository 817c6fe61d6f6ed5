"""The dashboard at ``/``: a devices x RMM tools matrix with a drill-down to files.

Login exchanges the API token for an HttpOnly, SameSite=Strict session cookie. Pages are
static files; the script is ``/static/app.js`` (no inline script, a strict CSP) and it writes
every value with ``textContent``, so a hostile signer name is shown, never run. No GET
changes state: login and logout are POSTs.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from agent.output import plain
from collector.storage import Collector, cell_files, ingest_marker, matrix_cells

STATIC = Path(__file__).resolve().parent / "static"
MAX_DAYS = 3650
#: how long a built matrix is served again while nothing new was ingested through the API; also
#: the bound on how stale it can be after a `collector import` (which another process runs)
MATRIX_TTL = 15.0


def _days(days: float) -> float:
    days = float(days)
    return max(0.01, min(days, MAX_DAYS)) if math.isfinite(days) else 5.0


def _since(days: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=_days(days))


def build_matrix(collector: Collector, days: float) -> dict[str, Any]:
    """The matrix for the page, compact (500 devices x 60 tools is 30,000 cells): devices and
    tools listed once, each cell an array ``[device index, tool index, FirstSeen, LastSeen,
    Count, Running, Untrusted]`` with times in epoch seconds (UTC) and flags as 0/1."""
    found = matrix_cells(collector, _since(days))
    device_names: dict[str, str] = {c.device_id: c.device_name for c in found}
    devices = sorted(device_names.items(), key=lambda x: (x[1], x[0]))
    used_tools = sorted({c.tool for c in found}, key=str.casefold)
    device_index = {d: i for i, (d, _n) in enumerate(devices)}
    tool_index = {t: i for i, t in enumerate(used_tools)}
    techniques: dict[str, set[str]] = {}
    for rule in collector.rules:
        techniques.setdefault(rule.tool, set()).update(rule.techniques)
    dropped = {d["DeviceId"]: d["DroppedRows"] for d in collector.list_devices()}
    return {
        "ruleset_version": collector.hits_ruleset() or collector.ruleset,
        "devices": [{"DeviceId": d, "DeviceName": n, "DroppedRows": dropped.get(d, 0)} for d, n in devices],
        "tools": [{"Tool": t, "Techniques": sorted(techniques.get(t, ()))} for t in used_tools],
        "cell_columns": ["Device", "Tool", "FirstSeen", "LastSeen", "Count", "Running", "Untrusted"],
        "time_unit": "epoch seconds, UTC",
        "cells": [
            [
                device_index[c.device_id],
                tool_index[c.tool],
                c.first_seen,
                c.last_seen,
                c.row_count,
                1 if c.running else 0,
                1 if c.untrusted else 0,
            ]
            for c in found
        ],
    }


class MatrixCache:
    """The matrix as JSON bytes, per (rule-set version, window, ingest marker), for MATRIX_TTL
    seconds. One build at a time: a burst of page loads runs the 500 x 60 query once."""

    def __init__(self, collector: Collector, ttl: float = MATRIX_TTL) -> None:
        self.collector = collector
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[float, bytes]] = {}

    def get(self, days: float) -> bytes:
        with self._lock:
            key = (self.collector.hits_ruleset() or self.collector.ruleset, days, ingest_marker(self.collector))
            now = time.monotonic()
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self.ttl:
                return hit[1]
            body = json.dumps(build_matrix(self.collector, days), ensure_ascii=False, separators=(",", ":"))
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl and k[0] == key[0]}
            self._entries[key] = (now, body.encode("utf-8"))
            return self._entries[key][1]


def add_dashboard(app: FastAPI, collector: Collector, secrets: Any, require_token: Callable[[Request], None]) -> None:
    def logged_in(request: Request) -> bool:
        try:
            require_token(request)
        except HTTPException:
            return False
        return True

    matrix_cache = MatrixCache(collector)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        if not logged_in(request):
            return FileResponse(STATIC / "login.html", media_type="text/html")
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = await request.body()
        if len(body) > 4096:
            raise HTTPException(status_code=413)
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        from collector.api import SESSION_COOKIE, _same

        if not _same(token, secrets.api_token):
            return RedirectResponse("/?error=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            secrets.session_value(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        from collector.api import SESSION_COOKIE

        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/api/v1/matrix", responses={401: {"description": "API token required"}})
    async def matrix(request: Request, days: float = 5.0) -> Response:
        require_token(request)
        body = await run_in_threadpool(matrix_cache.get, _days(days))
        return Response(body, media_type="application/json")

    @app.get("/api/v1/matrix/cell", responses={401: {"description": "API token required"}})
    async def cell(request: Request, device: str, tool: str, days: float = 5.0) -> JSONResponse:
        require_token(request)
        rule_ids = [r.id for r in collector.rules if r.tool == tool]
        files = await run_in_threadpool(cell_files, collector, device, rule_ids, _since(days)) if rule_ids else []
        return JSONResponse(plain({"DeviceId": device, "Tool": tool, "files": files}))
