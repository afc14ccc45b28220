"""The REST API and the live feeds (``/v1``).

::

    GET    /v1/calls                      active and stored calls, newest first (state, since,
                                          until, limit, cursor)
    GET    /v1/calls/{id}                 one call ({id} = call id or a source id, e.g. callSid)
    GET    /v1/calls/{id}/transcript      ?format=json|text|vtt|srt
    DELETE /v1/calls/{id}                 admin: delete a finished call (retention)
    GET    /v1/calls/{id}/events          Server-Sent Events; id = seq; resume: Last-Event-ID
    GET    /v1/calls/{id}/live            WebSocket of the same events; resume: ?after=SEQ
    GET    /v1/events                     SSE firehose of every call; id = gateway-wide seq
    GET    /v1/openapi.json               the OpenAPI document of these routes
    GET    /                              the dashboard (one static page)

Live feeds send the events after the resume point first (the state so far for a new
subscriber), then each new event as it is published; a per-call feed ends after ``call.ended``.
A subscriber that falls ``live.queue_limit`` events behind gets an ``error`` event
(``slow_consumer``) and is disconnected; the call never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from gateway.api.auth import CORS_ORIGIN, Access, ApiAuth
from gateway.calls.call import Call, CallState
from gateway.calls.registry import CallRegistry
from gateway.outputs.events import CallEvent, call_summary
from gateway.outputs.live import FirehoseEvent, LiveHub, Subscribed, Subscription
from gateway.outputs.transcript_files import call_document
from gateway.transcript.model import Transcript
from gateway.transcript.render import FORMATS, render, to_json

AUTH = web.AppKey("api_auth", ApiAuth)
HUB = web.AppKey("live_hub", LiveHub)
KEEPALIVE_S = web.AppKey("live_keepalive_s", float)

_CONTENT_TYPES = {
    "json": "application/json",
    "text": "text/plain",
    "vtt": "text/vtt",
    "srt": "application/x-subrip",
}


class StoreReader(Protocol):
    """What the routes read from the durable store (``gateway.outputs.store``)."""

    async def get_call(self, ident: str) -> dict[str, Any] | None: ...

    async def list_calls(
        self,
        *,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]: ...

    async def events(self, call_id: str, after_seq: int = 0) -> list[CallEvent]: ...

    async def transcript(self, call_id: str) -> Transcript | None: ...

    async def delete_call(self, call_id: str) -> bool: ...

    async def writable(self) -> None:
        """Raise unless a write would succeed now (readiness)."""


STORE = web.AppKey("api_store", StoreReader)
REGISTRY = web.AppKey("api_registry", CallRegistry)
DeleteHook = Callable[[dict[str, Any]], Awaitable[None]]
ON_DELETE = web.AppKey("api_on_delete", list[DeleteHook])


_DASHBOARD = Path(__file__).with_name("dashboard") / "index.html"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", dashboard)
    r.add_get("/v1/calls", list_calls)
    r.add_get("/v1/calls/{id}", get_call)
    r.add_delete("/v1/calls/{id}", delete_call)
    r.add_get("/v1/calls/{id}/transcript", get_transcript)
    r.add_get("/v1/calls/{id}/events", call_events_sse)
    r.add_get("/v1/calls/{id}/live", call_events_ws)
    r.add_get("/v1/events", firehose_sse)
    r.add_get("/v1/openapi.json", openapi_json)


async def dashboard(request: web.Request) -> web.Response:
    """The dashboard page (static: it holds no data; it reads the API with the user's token)."""
    body = await asyncio.to_thread(_DASHBOARD.read_bytes)
    return web.Response(
        body=body,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'",
        },
    )


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document (open: it describes routes, not data)."""
    from gateway.api.openapi import openapi_document

    return web.json_response(openapi_document(), dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _store(request: web.Request) -> StoreReader | None:
    return request.app.get(STORE)


def _live_call(request: web.Request, ident: str) -> Call | None:
    call = request.app[REGISTRY].get(ident)
    return call


async def _find(request: web.Request) -> tuple[Call | None, dict[str, Any]]:
    """The call named in the path: (live or recent Call object if in memory, summary)."""
    ident = request.match_info["id"]
    call = _live_call(request, ident)
    if call is not None:
        return call, call_summary(call)
    store = _store(request)
    if store is not None:
        summary = await store.get_call(ident)
        if summary is not None:
            return None, summary
    raise web.HTTPNotFound(text="no such call\n")


def _float(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # nan/inf would silently match nothing or everything
        raise web.HTTPBadRequest(text=f"{name} must be a finite number (unix time)\n")
    return value


_STATES = ("new", "active", "ending", "ended", "failed", "interrupted")


async def list_calls(request: web.Request) -> web.Response:
    request.app[AUTH].require(request)
    state = request.query.get("state") or None
    if state is not None and state not in _STATES:
        raise web.HTTPBadRequest(text=f"state must be one of {', '.join(_STATES)}\n")
    since, until = _float(request, "since"), _float(request, "until")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise web.HTTPBadRequest(text="limit must be an integer\n") from None
    if not 1 <= limit <= 1000:
        raise web.HTTPBadRequest(text="limit must be 1-1000\n")
    cursor = request.query.get("cursor") or None
    live = {c.call_id: c for c in (lv.call for lv in request.app[REGISTRY].active())}
    store = _store(request)
    calls: list[dict[str, Any]]
    next_cursor: str | None = None
    if store is not None:
        try:
            calls, next_cursor = await store.list_calls(
                state=state, since=since, until=until, limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        # Active calls: the in-memory view is fresher than the stored row.
        calls = [call_summary(live[c["id"]]) if c["id"] in live else c for c in calls]
    else:
        everything = [*live.values(), *request.app[REGISTRY].recent()]
        summaries = [call_summary(c) for c in everything]
        summaries = [
            s
            for s in summaries
            if (state is None or s["state"] == state)
            and (since is None or (s["started_at"] or 0) >= since)
            and (until is None or (s["started_at"] or 0) < until)
        ]
        summaries.sort(key=lambda s: (s["started_at"] or 0, s["id"]), reverse=True)
        if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
            raise web.HTTPBadRequest(text="invalid cursor\n")  # as the store answers
        start = int(cursor) if cursor else 0
        calls = summaries[start : start + limit]
        if start + limit < len(summaries):
            next_cursor = str(start + limit)
    return web.json_response(
        {"calls": calls, "next_cursor": next_cursor, "now": time.time()}, dumps=_dumps
    )


async def get_call(request: web.Request) -> web.Response:
    request.app[AUTH].require(request)
    _, summary = await _find(request)
    return web.json_response(summary, dumps=_dumps)


async def delete_call(request: web.Request) -> web.Response:
    request.app[AUTH].require(request, Access.ADMIN)
    call, summary = await _find(request)
    if summary["state"] in ("new", "active", "ending"):
        raise web.HTTPConflict(text="the call is still active\n")
    if request.app[REGISTRY].finishing(summary["id"]):
        # Ended, but its last events, transcript file and webhooks are still being written:
        # deleting now would let those writes bring the call back.
        raise web.HTTPConflict(
            text="the call has just ended and is still being saved; retry shortly\n",
            headers={"Retry-After": "1"},
        )
    store = _store(request)
    deleted = await store.delete_call(summary["id"]) if store is not None else False
    await forget_call(request.app, summary)
    if not deleted and call is None:
        raise web.HTTPNotFound(text="no such call\n")
    return web.Response(status=204)


async def forget_call(app: web.Application, summary: dict[str, Any]) -> None:
    """Drop a call deleted from the store everywhere else: memory (registry, live logs) and
    the files outside the store (``ON_DELETE`` hooks: transcript export, recording)."""
    app[REGISTRY].forget(summary["id"])
    app[HUB].forget(summary["id"])
    for hook in app.get(ON_DELETE, ()):
        await hook(summary)


async def get_transcript(request: web.Request) -> web.Response:
    request.app[AUTH].require(request)
    call, summary = await _find(request)
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise web.HTTPBadRequest(text=f"unknown format {fmt!r}; use {', '.join(FORMATS)}\n")
    snapshot: dict[str, Any] | Transcript
    if call is not None and call.state in (CallState.ENDED, CallState.FAILED):
        # Nothing changes a finished call: build and encode in a worker (seconds for hours).
        text = await asyncio.to_thread(_render_call, call, fmt)
    elif call is not None:
        # A live call: a snapshot on the loop, encoded in a worker.
        snapshot = call_document(call) if fmt == "json" else call.transcript()
        text = await asyncio.to_thread(_encode, snapshot, fmt)
    else:
        store = _store(request)
        stored = await store.transcript(summary["id"]) if store is not None else None
        if stored is None:
            raise web.HTTPNotFound(text="no transcript for this call\n")
        snapshot = stored
        if fmt == "json":
            snapshot = to_json(stored)
            snapshot.update(
                source=summary["source"],
                source_ids=summary["source_ids"],
                state=summary["state"],
                end_reason=summary["end_reason"],
                started_at=summary["started_at"],
                ended_at=summary["ended_at"],
            )
        text = await asyncio.to_thread(_encode, snapshot, fmt)
    return web.Response(text=text, content_type=_CONTENT_TYPES.get(fmt, "text/plain"))


def _encode(snapshot: dict[str, Any] | Transcript, fmt: str) -> str:
    """The JSON document, or the transcript rendered as ``fmt`` (worker thread)."""
    if isinstance(snapshot, Transcript):
        return render(snapshot, fmt)
    return _dumps(snapshot)


def _render_call(call: Call, fmt: str) -> str:
    """A finished call's transcript in ``fmt`` (worker thread)."""
    return _encode(call_document(call) if fmt == "json" else call.transcript(), fmt)


# -- live feeds -----------------------------------------------------------------------------------


_MAX_SEQ = 2**63 - 1  # SQLite's integer range: sequence numbers are stored there


def _resume_point(request: web.Request, *, header: bool) -> int | None:
    raw = request.headers.get("Last-Event-ID") if header else None
    if not raw:
        raw = request.query.get("after")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="Last-Event-ID / after must be an integer\n") from None
    if not 0 <= value <= _MAX_SEQ:
        raise web.HTTPBadRequest(text=f"Last-Event-ID / after must be in [0, {_MAX_SEQ}]\n")
    return value


async def _stored_backlog(request: web.Request, call_id: str, after: int) -> list[CallEvent]:
    store = _store(request)
    if store is None:
        return []
    return await store.events(call_id, after)


async def _with_stored(
    request: web.Request, call_id: str, after: int, subscribed: Subscribed
) -> list[CallEvent]:
    """The backlog of a subscription, with the events no longer in memory read from the store
    first (the subscription is already live, so nothing falls between the two)."""
    if subscribed.store_before is None:
        return subscribed.backlog
    first = subscribed.store_before
    stored = [e for e in await _stored_backlog(request, call_id, after) if e.seq < first]
    return stored + subscribed.backlog


async def _open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        }
    )
    origin = request.get(CORS_ORIGIN)
    if origin:
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Vary"] = "Origin"
    # The stream ends when the connection does: never reused for another request.
    resp.force_close()
    await resp.prepare(request)
    if request.method != "HEAD":
        await resp.write(b": stream open\n\n")  # sends the headers now
    return resp


def _direct_sink(
    request: web.Request, resp: web.StreamResponse, encode: Callable[[Any], bytes]
) -> Callable[[Any], bool]:
    """A Subscription sink writing whole SSE messages straight to the socket.

    Used only once the headers are out and while the feed's own task is idle (Subscription
    guarantees that), so messages never interleave mid-way; each is framed as one HTTP chunk
    when the response is chunked (HTTP/1.1). Refuses (the item is queued and the task writes
    it with back-pressure) when the socket buffer holds more than 64 KiB.
    """
    transport = request.transport
    chunked = resp.headers.get("Transfer-Encoding", "").lower() == "chunked"

    def sink(item: Any) -> bool:
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > 65536:
            return False
        data = encode(item)
        if chunked:
            transport.writelines((f"{len(data):x}\r\n".encode(), data, b"\r\n"))
        else:
            transport.write(data)
        return True

    return sink


def _sse_event(event_id: int, event: CallEvent) -> bytes:
    return f"id: {event_id}\nevent: {event.type}\ndata: {event.json_text}\n\n".encode()


def _sse(event_id: int | None, type_: str, data: dict[str, Any]) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {type_}\ndata: {_dumps(data)}\n\n".encode()


async def _pump(sub: Subscription, keepalive_s: float, send: Any, ping: Any) -> str:
    """Forward ``sub`` to the client until it closes; returns the close reason."""
    while True:
        try:
            async with asyncio.timeout(keepalive_s):
                item = await sub.get()
        except TimeoutError:
            await ping()
            continue
        if item is None:
            return sub.closed_reason or "closed"
        sub.busy = True
        try:
            await send(item)
        finally:
            sub.busy = False


async def call_events_sse(request: web.Request) -> web.StreamResponse:
    request.app[AUTH].require(request)
    call, summary = await _find(request)
    call_id = summary["id"]
    after = _resume_point(request, header=True) or 0
    if request.method == "HEAD":
        return await _open_sse(request)  # a HEAD response has no content
    hub = request.app[HUB]
    subscribed = hub.subscribe(call_id, after, call)
    if subscribed is None:
        stored = await _stored_backlog(request, call_id, after)
        if not stored:
            return web.Response(status=204)  # ended, nothing new: EventSource stops here
        resp = await _open_sse(request)
        for event in stored:
            await resp.write(_sse_event(event.seq, event))
        return resp
    sub = subscribed.sub
    try:
        backlog = await _with_stored(request, call_id, after, subscribed)
        if not backlog and sub.closed_reason == "call_ended":
            return web.Response(status=204)
        resp = await _open_sse(request)
    except BaseException:
        hub.unsubscribe(call_id, sub)  # the store or the client failed before the feed began
        raise
    try:
        for event in backlog:
            await resp.write(_sse_event(event.seq, event))
        sub.sink = _direct_sink(request, resp, lambda e: _sse_event(e.seq, e))

        async def send(event: CallEvent) -> None:
            await resp.write(_sse_event(event.seq, event))

        async def ping() -> None:
            await resp.write(b": keepalive\n\n")

        reason = await _pump(sub, request.app[KEEPALIVE_S], send, ping)
        if reason not in ("call_ended",):
            await resp.write(_sse(None, "error", {"reason": reason}))
    except ConnectionResetError:
        pass  # the client went away
    finally:
        hub.unsubscribe(call_id, sub)
    return resp


async def call_events_ws(request: web.Request) -> web.StreamResponse:
    request.app[AUTH].require(request)
    call, summary = await _find(request)
    call_id = summary["id"]
    after = _resume_point(request, header=False) or 0
    ws = web.WebSocketResponse(heartbeat=request.app[KEEPALIVE_S], compress=False)
    await ws.prepare(request)
    hub = request.app[HUB]
    subscribed = hub.subscribe(call_id, after, call)
    if subscribed is None:
        for event in await _stored_backlog(request, call_id, after):
            await ws.send_str(event.json_text)
        await ws.close(code=1000, message=b"call_ended")
        return ws
    sub = subscribed.sub

    async def reader() -> None:
        # Drain client frames so pings/closes are processed; a close ends the feed.
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
        sub.close("client_closed")

    read_task = asyncio.create_task(reader(), name=f"live-ws-reader-{call_id}")
    try:
        for event in await _with_stored(request, call_id, after, subscribed):
            await ws.send_str(event.json_text)

        async def send(event: CallEvent) -> None:
            await ws.send_str(event.json_text)

        async def ping() -> None:
            return None  # aiohttp's heartbeat pings

        reason = await _pump(sub, request.app[KEEPALIVE_S], send, ping)
        if not ws.closed:
            code = 1000 if reason in ("call_ended", "client_closed") else 1008
            if reason == "shutdown":
                code = 1001
            await ws.close(code=code, message=reason.encode())
    except ConnectionResetError:
        pass
    finally:
        hub.unsubscribe(call_id, sub)
        read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await read_task
    return ws


async def firehose_sse(request: web.Request) -> web.StreamResponse:
    request.app[AUTH].require(request)
    after = _resume_point(request, header=True)
    if request.method == "HEAD":
        return await _open_sse(request)  # a HEAD response has no content
    hub = request.app[HUB]
    backlog, sub, complete = hub.subscribe_all(after)
    try:
        resp = await _open_sse(request)
    except BaseException:
        hub.unsubscribe_all(sub)  # the client left before the feed began
        raise
    try:
        if not complete:
            oldest = backlog[0].gseq if backlog else hub.last_gseq + 1  # the first id replayed
            await resp.write(_sse(None, "error", {"reason": "resume_gap", "oldest": oldest}))
        for item in backlog:
            await resp.write(_sse_event(item.gseq, item.event))
        sub.sink = _direct_sink(request, resp, lambda i: _sse_event(i.gseq, i.event))

        async def send(item: FirehoseEvent) -> None:
            await resp.write(_sse_event(item.gseq, item.event))

        async def ping() -> None:
            await resp.write(b": keepalive\n\n")

        reason = await _pump(sub, request.app[KEEPALIVE_S], send, ping)
        await resp.write(_sse(None, "error", {"reason": reason}))
    except ConnectionResetError:
        pass
    finally:
        hub.unsubscribe_all(sub)
    return resp
