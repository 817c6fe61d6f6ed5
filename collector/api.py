"""The collector's HTTP API (FastAPI): enrolment, ingest, the query API and the dashboard.

- ``POST /api/v1/enroll``: the enrol secret -> a per-device node key (stored hashed).
- ``POST /api/v1/rows``: a gzip JSON batch authenticated by its node key; bounded in request
  size, decompressed size, rows and field lengths; a bad request gets a 4xx, never a 5xx.
- ``GET /api/v1/...``: the query API, for the bearer API token (or the dashboard's session
  cookie) only. The enrol secret and node keys read nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agent.output import plain
from collector.storage import Collector, FleetResult
from collector.wire import BoundedInflater, Limits, WireError, parse_batch, parse_datetime, row_to_wire

log = logging.getLogger(__name__)

DEVICE_ID = re.compile(r"^[0-9a-f]{40}$")
SESSION_COOKIE = "rmmhunt_session"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_BATCH_SCHEMA = {
    "type": "object",
    "required": ["node_key", "batch_id", "rows"],
    "properties": {
        "node_key": {"type": "string"},
        "batch_id": {"type": "string"},
        "dropped_total": {"type": "integer", "minimum": 0},
        "rows": {"type": "array", "items": {"type": "object"}},
    },
}
_ENROLL_SCHEMA = {
    "type": "object",
    "required": ["enroll_secret", "device_id"],
    "properties": {
        "enroll_secret": {"type": "string"},
        "device_id": {"type": "string"},
        "device_name": {"type": "string"},
    },
}


@dataclass(frozen=True)
class Secrets:
    enroll_secret: str
    api_token: str

    def session_value(self) -> str:
        # the cookie holds a value derived from the token, not the token itself
        return hmac.new(self.api_token.encode(), b"rmmhunt-dashboard-session", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape"))


def result_record(r: FleetResult) -> dict[str, Any]:
    return {
        "RuleId": r.rule.id,
        "RuleName": r.rule.name,
        "Tool": r.rule.tool,
        "Techniques": list(r.rule.techniques),
        "SharedWith": list(r.rule.shared_with),
        **r.result,
    }


async def _read_body(request: Request, limits: Limits) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise WireError(413, f"request larger than {limits.max_request_bytes} bytes")
    gzipped = request.headers.get("content-encoding", "identity").lower() == "gzip"
    inflater = BoundedInflater(limits.max_decompressed_bytes) if gzipped else None
    size = 0
    plain_parts: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_request_bytes:
            raise WireError(413, f"request larger than {limits.max_request_bytes} bytes")
        if inflater is not None:
            inflater.feed(chunk)
        else:
            plain_parts.append(chunk)
    return inflater.finish() if inflater is not None else b"".join(plain_parts)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(400, f"malformed JSON: {exc}") from exc


def create_app(collector: Collector, secrets: Secrets, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="rmmhunt collector", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(WireError)
    async def _wire_error(_request: Request, exc: WireError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": "invalid request", "detail": json.loads(json.dumps(exc.errors(), default=str))}, status_code=422
        )

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def require_token(request: Request) -> None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and _same(auth[7:].strip(), secrets.api_token):
            return
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie and _same(cookie, secrets.session_value()):
            return
        raise HTTPException(status_code=401, detail="API token required", headers={"WWW-Authenticate": "Bearer"})

    # --- ingest

    @app.post(
        "/api/v1/enroll",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _ENROLL_SCHEMA}}}},
        responses={401: {"description": "bad enrol secret"}, 403: {"description": "device revoked"}},
    )
    async def enroll(request: Request) -> JSONResponse:
        body = _json(await _read_body(request, Limits(max_request_bytes=64 * 1024, max_decompressed_bytes=64 * 1024)))
        if not isinstance(body, dict):
            raise WireError(422, "expected a JSON object")
        secret, device_id, name = body.get("enroll_secret"), body.get("device_id"), body.get("device_name", "")
        if not isinstance(secret, str) or not _same(secret, secrets.enroll_secret):
            raise WireError(401, "bad enrol secret")
        if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
            raise WireError(422, "device_id: 40 lowercase hex characters")
        if not isinstance(name, str) or len(name) > 255 or "\x00" in name:
            raise WireError(422, "device_name: a string of at most 255 characters")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise WireError(422, "device_name: not valid text") from exc
        node_key = await run_in_threadpool(collector.enroll, device_id, name)
        if node_key is None:
            raise WireError(403, "device revoked")
        return JSONResponse({"device_id": device_id, "node_key": node_key})

    @app.post(
        "/api/v1/rows",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _BATCH_SCHEMA}}}},
        responses={
            401: {"description": "unknown or revoked node key"},
            403: {"description": "a row of another device"},
            413: {"description": "too large"},
            422: {"description": "malformed rows"},
        },
    )
    async def post_rows(request: Request) -> JSONResponse:
        payload = _json(await _read_body(request, limits))
        node_key, batch_id, dropped, rows = parse_batch(payload, limits)
        device_id = await run_in_threadpool(collector.device_for_key, node_key)
        if device_id is None:
            raise WireError(401, "unknown or revoked node key")
        foreign = [r["DeviceId"] for r in rows if r["DeviceId"] != device_id]
        if foreign:
            raise WireError(403, "rows of another device")
        result = await run_in_threadpool(lambda: collector.ingest(rows, device_id=device_id, dropped_total=dropped))
        return JSONResponse(
            {"batch_id": batch_id, "accepted": result.accepted, "duplicates": result.duplicates, "hits": result.hits}
        )

    # --- query API

    @app.get("/api/v1/hunts", responses={401: {"description": "API token required"}})
    async def get_hunts(request: Request, rule: str | None = None, include_excluded: bool = False) -> JSONResponse:
        """Every rule fleet-wide. Hits the agents excluded are left out unless ``include_excluded``."""
        require_token(request)
        results = await run_in_threadpool(
            lambda: collector.hunt(rule_ids=[rule] if rule else None, include_excluded=include_excluded)
        )
        return JSONResponse(
            plain(
                {
                    "include_excluded": include_excluded,
                    "ruleset_version": collector.hits_ruleset() or collector.ruleset,
                    "loaded_ruleset_version": collector.ruleset,
                    "reevaluating": collector.reevaluating,
                    "results": [result_record(r) for r in results],
                }
            )
        )

    @app.get("/api/v1/hunts/{rule_id}", responses={401: {"description": "API token required"}, 404: {}})
    async def get_hunt(
        request: Request, rule_id: str, limit: int = 1000, include_excluded: bool = False
    ) -> JSONResponse:
        """One rule with its drill-down rows; with ``include_excluded`` also the hits agents excluded
        (each row then has ExcludedBy: the exclusion id, or null)."""
        require_token(request)
        if rule_id not in {r.id for r in collector.rules}:
            raise HTTPException(status_code=404, detail="unknown rule id")
        now = dt.datetime.now(dt.UTC)
        limit = max(1, min(limit, 10000))
        results = await run_in_threadpool(
            lambda: collector.hunt(now=now, rule_ids=[rule_id], include_excluded=include_excluded)
        )
        rows = await run_in_threadpool(
            lambda: collector.rule_rows(rule_id, now=now, limit=limit, include_excluded=include_excluded)
        )
        out = []
        for r in results:
            rec = result_record(r)
            keys = [k for k in ("DeviceId", "DeviceName") if k in r.result]
            report = r.result.get("Report")
            rec["Rows"] = [
                row
                for row in rows
                if all(row.get(k) == r.result[k] for k in keys)
                and (not isinstance(report, list) or row["ReportId"] in report)
            ]
            out.append(rec)
        version = collector.hits_ruleset() or collector.ruleset
        return JSONResponse(plain({"include_excluded": include_excluded, "ruleset_version": version, "results": out}))

    @app.get("/api/v1/devices", responses={401: {"description": "API token required"}})
    async def get_devices(request: Request) -> JSONResponse:
        require_token(request)
        return JSONResponse(plain({"devices": await run_in_threadpool(collector.list_devices)}))

    @app.get("/api/v1/devices/{device_id}/rows", responses={401: {"description": "API token required"}})
    async def get_device_rows(request: Request, device_id: str, limit: int = 1000, offset: int = 0) -> JSONResponse:
        require_token(request)
        limit, offset = max(1, min(limit, 10000)), max(0, min(offset, 2**62))
        rows = await run_in_threadpool(
            lambda: list(collector.iter_rows(device_id=device_id, limit=limit, offset=offset))
        )
        return JSONResponse({"rows": [row_to_wire(r) for r in rows]})

    @app.get(
        "/api/v1/rows",
        responses={200: {"content": {"application/x-ndjson": {}}}, 401: {"description": "API token required"}},
    )
    async def get_rows(request: Request, since: str | None = None) -> StreamingResponse:
        require_token(request)
        start = parse_datetime(since, "since") if since else None

        def lines() -> Iterator[bytes]:
            for row in collector.iter_rows(since=start):
                yield (json.dumps(row_to_wire(row), ensure_ascii=False) + "\n").encode("utf-8")

        async def stream() -> AsyncIterator[bytes]:
            iterator = lines()
            while True:
                chunk = await run_in_threadpool(lambda: next(iterator, None))
                if chunk is None:
                    return
                yield chunk

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    from collector.dashboard import add_dashboard

    add_dashboard(app, collector, secrets, require_token)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        from collector.dashboard import STATIC

        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(status_code=404)
        return FileResponse(path)

    return app
