"""The OpenAPI document against the running server (schemathesis) and against the router.

One gateway (scripted recognizer, read and admin tokens) runs for the whole module on its own event
loop in a background thread, with three calls: two finished (one kept, one for ``DELETE``) and one
held active. Schemathesis runs from plain sync tests (it uses blocking ``requests``): every
operation of the document but the firehose (``GET /v1/events`` never ends) gets the examples,
coverage and fuzzing phases with the admin token, and every response is validated against the
document (status code, content type, headers, body). Each well-formed generated request is sent a
second time naming a real call, so the 200 bodies are checked too, not only the 404s. The feeds
(firehose with a bounded read, per-call SSE, WebSocket) are read by hand and each event is validated
against the ``CallEvent`` schema.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from gateway.api.openapi import openapi_document
from gateway.api.routes import HUB
from gateway.app import make_app
from gateway.calls.call import CallState
from gateway.config import Settings
from gateway.ingress.twilio_signature import compute_signature
from tests.gateway_server import (
    TOKEN,
    Gateway,
    call_messages,
    connected,
    hello_engine,
    media,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
    start,
    stop,
)

READ_TOKEN = "contract-read-token-0123456789"
ADMIN_TOKEN = "contract-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
DONE_SID = "CA00000000000000000000000000000d01"  # finished, kept
GONE_SID = "CA00000000000000000000000000000d02"  # finished, deleted by test_delete_call
LIVE_SID = "CA00000000000000000000000000000a01"  # active for the whole module
FIREHOSE = "/v1/events"  # streams forever: read by hand, with a bound
TIMEOUT_S = 10.0

T = TypeVar("T")
Case = schemathesis.Case[Any]

DOCUMENT = openapi_document()
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT)


# -- the gateway on its own loop ------------------------------------------------------------------


@dataclass
class Calls:
    done: str
    gone: str
    live: str


class BackgroundGateway:
    """A real gateway on 127.0.0.1, served by an event loop in a thread of its own."""

    def __init__(self, data_dir: Path) -> None:
        self._settings = settings_for(
            data_dir, api={"tokens": [READ_TOKEN], "admin_tokens": [ADMIN_TOKEN]}
        )
        self._thread = threading.Thread(target=self._main, name="contract-gateway", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.gw: Gateway | None = None
        self.calls: Calls | None = None

    def __enter__(self) -> BackgroundGateway:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("the gateway did not start within 60 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "the gateway did not stop within 60 s"
        if self._error is not None:
            raise self._error

    @property
    def http(self) -> str:
        assert self.gw is not None
        return self.gw.http

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run ``coro`` on the gateway's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__/__exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_gateway(self._settings, hello_engine()) as gw:
            for sid in (DONE_SID, GONE_SID):
                closed = await send_messages(gw.ws(), call_messages(sid, 2.0))
                assert (closed.code, closed.reason) == (1000, "stop")
            await gw.idle()
            release = asyncio.Event()
            held = asyncio.create_task(_hold_call(gw, LIVE_SID, release))
            try:
                await poll_until(
                    lambda: (
                        (c := gw.registry.get(LIVE_SID)) is not None and c.state is CallState.ACTIVE
                    )
                )
                ids = {}
                for sid in (DONE_SID, GONE_SID, LIVE_SID):
                    call = gw.registry.get(sid)
                    assert call is not None
                    ids[sid] = call.call_id
                self.calls = Calls(ids[DONE_SID], ids[GONE_SID], ids[LIVE_SID])
                self.gw = gw
                self._ready.set()
                await self._stop.wait()
            finally:
                release.set()
                await asyncio.wait_for(held, 30)
                await gw.idle()


async def _hold_call(gw: Gateway, call_sid: str, release: asyncio.Event) -> None:
    """A Twilio stream that starts a call and keeps it active until ``release``."""
    url = gw.ws()
    headers = {"X-Twilio-Signature": compute_signature(TOKEN, url)}
    async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=headers) as ws:
        await ws.send_str(connected())
        await ws.send_str(start(call_sid))
        for i in range(25):
            await ws.send_str(media("outbound", i * 20, seq=2 * i + 2))
            await ws.send_str(media("inbound", i * 20, seq=2 * i + 3))
        await release.wait()
        await ws.send_str(stop(call_sid))
        await ws.receive(timeout=30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundGateway]:
    with BackgroundGateway(tmp_path_factory.mktemp("contract")) as bg:
        yield bg


@pytest.fixture(scope="module")
def calls(gateway: BackgroundGateway) -> Calls:
    assert gateway.calls is not None
    return gateway.calls


# -- the document and the router ------------------------------------------------------------------

_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _router_operations(settings: Settings) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in make_app(settings).router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        # aiohttp adds HEAD beside every GET (allow_head): HTTP gives it to GET, not documented.
        if route.method != "HEAD":
            out.add((path, route.method.lower()))
    return out


def _ingress_operations(settings: Settings) -> set[tuple[str, str]]:
    """The platforms' media streams and Twilio's webhook: paths from config, not documented."""
    streams = (
        settings.twilio,
        settings.telnyx,
        settings.signalwire,
        settings.audiohook,
        settings.stereo_ws,
    )
    ops = {(conf.path, "get") for conf in streams}
    return ops | {(settings.twilio.voice_path, "post")}


def _document_operations() -> set[tuple[str, str]]:
    return {
        (path, method)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_document_paths_match_the_router(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    served = _router_operations(settings)
    documented = _document_operations()
    v1 = {op for op in served if op[0].startswith("/v1")}
    assert v1 == {op for op in documented if op[0].startswith("/v1")}
    # Outside /v1 too, every route is documented but the ingress endpoints, and vice versa.
    assert served - _ingress_operations(settings) == documented
    assert {
        ("/v1/calls", "get"),
        ("/v1/calls/{id}", "get"),
        ("/v1/calls/{id}", "delete"),
        ("/v1/calls/{id}/transcript", "get"),
        ("/v1/calls/{id}/events", "get"),
        ("/v1/calls/{id}/live", "get"),
        ("/v1/events", "get"),
        ("/v1/openapi.json", "get"),
        ("/healthz", "get"),
        ("/metrics", "get"),
    } <= documented


def test_every_token_route_declares_security_and_401() -> None:
    top = DOCUMENT["security"]
    assert {next(iter(s)) for s in top} == {"bearer", "access_token"}
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            open_route = not path.startswith("/v1") or path == "/v1/openapi.json"
            assert (operation.get("security") == []) is open_route, (method, path)
            if not open_route:
                assert "401" in operation["responses"], (method, path)
                assert "403" in operation["responses"], (method, path)


def test_document_is_valid_openapi_and_served_as_is(gateway: BackgroundGateway) -> None:
    SCHEMA.validate()  # against the OpenAPI 3.0 meta-schema
    assert openapi_document() == DOCUMENT  # pure: the same document on every call
    resp = requests.get(f"{gateway.http}/v1/openapi.json", timeout=TIMEOUT_S)  # no token
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == DOCUMENT
    assert json.loads(json.dumps(DOCUMENT)) == DOCUMENT  # plain JSON data


# -- schemathesis against the running server ------------------------------------------------------


def _real_id(case: Case, calls: Calls) -> str:
    """A call the request can name: the finished call (its feeds end), by call id or by callSid
    (picked from the generated id, so the choice is as reproducible as the case)."""
    return calls.done if len(str(case.path_parameters.get("id", ""))) % 2 else DONE_SID


@SCHEMA.exclude(path=FIREHOSE).exclude(method="DELETE").parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_operation_conforms_to_the_document(
    case: Case, gateway: BackgroundGateway, calls: Calls
) -> None:
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if positive and (case.query or {}).get("cursor"):
        # A cursor is opaque: any string is well formed, but one the server did not issue is
        # refused with 400 (documented), which schemathesis would count as valid data rejected.
        resp = case.call_and_validate(
            base_url=gateway.http,
            headers=ADMIN,
            timeout=TIMEOUT_S,
            excluded_checks=[positive_data_acceptance],
        )
        assert resp.status_code != 400 or "cursor" in resp.text, resp.text
        return
    if any(isinstance(v, list | tuple | dict) for v in (case.query or {}).values()):
        # A parameter sent more than once (a negative case: an array where one value belongs):
        # the server reads the first and ignores the rest, so the request may well be accepted.
        case.call_and_validate(
            base_url=gateway.http,
            headers=ADMIN,
            timeout=TIMEOUT_S,
            excluded_checks=[negative_data_rejection],
        )
        return
    case.call_and_validate(base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S)
    if "id" in (case.path_parameters or {}) and positive:
        # The same request for a call that exists: the 200 bodies get validated too.
        real = case.operation.Case(
            path_parameters={"id": _real_id(case, calls)},
            query=dict(case.query or {}),
            headers=dict(case.headers or {}),
        )
        real.call_and_validate(base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S)


@SCHEMA.include(method="DELETE").parametrize()
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_delete_of_unknown_calls_conforms(case: Case, gateway: BackgroundGateway) -> None:
    case.call_and_validate(base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S)


def _delete_case(ident: str) -> Case:
    return SCHEMA["/v1/calls/{id}"]["DELETE"].Case(path_parameters={"id": ident})


def test_delete_call(gateway: BackgroundGateway, calls: Calls) -> None:
    # A read token may not delete; an active call cannot be deleted.
    read = _delete_case(GONE_SID).call_and_validate(
        base_url=gateway.http, headers=READ, timeout=TIMEOUT_S
    )
    assert read.status_code == 403
    active = _delete_case(calls.live).call_and_validate(
        base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
    )
    assert active.status_code == 409
    gone = _delete_case(GONE_SID).call_and_validate(
        base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
    )
    assert gone.status_code == 204
    again = _delete_case(calls.gone).call_and_validate(
        base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
    )
    assert again.status_code == 404
    after = requests.get(f"{gateway.http}/v1/calls/{calls.gone}", headers=ADMIN, timeout=TIMEOUT_S)
    assert after.status_code == 404
    listed = requests.get(f"{gateway.http}/v1/calls", headers=ADMIN, timeout=TIMEOUT_S).json()
    assert calls.gone not in [c["id"] for c in listed["calls"]]
    assert calls.done in [c["id"] for c in listed["calls"]]


def test_listing_shows_active_and_finished_calls(gateway: BackgroundGateway, calls: Calls) -> None:
    op = SCHEMA["/v1/calls"]["GET"]
    active = op.Case(query={"state": "active"}).call_and_validate(
        base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
    )
    assert [c["id"] for c in active.json()["calls"]] == [calls.live]
    ended = op.Case(query={"state": "ended", "limit": 1}).call_and_validate(
        base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
    )
    page = ended.json()
    assert len(page["calls"]) == 1 and page["calls"][0]["state"] == "ended"
    # The active call's transcript so far is a valid document too.
    transcript = SCHEMA["/v1/calls/{id}/transcript"]["GET"].Case(path_parameters={"id": LIVE_SID})
    doc = transcript.call_and_validate(base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S)
    assert doc.json()["state"] == "active"


def test_paging_with_next_cursor(gateway: BackgroundGateway, calls: Calls) -> None:
    op = SCHEMA["/v1/calls"]["GET"]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        query: dict[str, Any] = {"limit": 1}
        if cursor is not None:
            query["cursor"] = cursor
        page = op.Case(query=query).call_and_validate(
            base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
        )
        body = page.json()
        seen.extend(c["id"] for c in body["calls"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert {calls.done, calls.live} <= set(seen)


@pytest.mark.parametrize("cursor", ["²", "x", "-1", "1.5", "W10", "WzEsMl0"])
def test_a_cursor_that_was_never_issued_is_refused(gateway: BackgroundGateway, cursor: str) -> None:
    case = SCHEMA["/v1/calls"]["GET"].Case(query={"cursor": cursor})
    resp = case.call_and_validate(base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S)
    assert resp.status_code == 400
    assert "cursor" in resp.text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "yesterday"])
def test_a_time_filter_that_is_not_a_finite_number_is_refused(
    gateway: BackgroundGateway, value: str
) -> None:
    for name in ("since", "until"):
        resp = requests.get(
            f"{gateway.http}/v1/calls", params={name: value}, headers=ADMIN, timeout=TIMEOUT_S
        )
        assert resp.status_code == 400, (name, value)
        assert name in resp.text


def test_a_deeply_nested_cursor_is_refused(gateway: BackgroundGateway) -> None:
    cursor = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")
    resp = requests.get(
        f"{gateway.http}/v1/calls", params={"cursor": cursor}, headers=ADMIN, timeout=TIMEOUT_S
    )
    assert resp.status_code == 400


# -- the feeds' events against the CallEvent schema -----------------------------------------------


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: ``nullable: true`` becomes a ``null`` type."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


def _validator(name: str) -> Callable[[Any], None]:
    root = {
        "$ref": f"#/components/schemas/{name}",
        "components": {"schemas": _json_schema(DOCUMENT["components"]["schemas"])},
    }
    validator = jsonschema_rs.Draft202012Validator(root)

    def validate(instance: Any) -> None:
        errors = [str(e) for e in validator.iter_errors(instance)]
        assert not errors, f"{name}: {errors}\n{json.dumps(instance)[:2000]}"

    return validate


@dataclass
class SseEvent:
    id: int | None
    type: str
    data: Any


def _sse_block(block: str) -> SseEvent | None:
    fields: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith(":") or not line:
            continue
        key, _, value = line.partition(":")
        fields[key] = value[1:] if value.startswith(" ") else value
    if "data" not in fields:
        return None
    event_id = int(fields["id"]) if "id" in fields else None
    return SseEvent(event_id, fields.get("event", "message"), json.loads(fields["data"]))


def _parse_sse(text: str) -> list[SseEvent]:
    """The complete events in ``text`` (blocks ended by a blank line)."""
    blocks = text.split("\n\n")[:-1]
    return [ev for ev in map(_sse_block, blocks) if ev is not None]


def _read_sse(resp: requests.Response, stop_when: Callable[[SseEvent], bool]) -> list[SseEvent]:
    events: list[SseEvent] = []
    lines: list[str] = []
    for raw in resp.iter_lines(decode_unicode=True):
        line = raw.decode() if isinstance(raw, bytes) else raw or ""
        if line:
            lines.append(line)
            continue
        ev = _sse_block("\n".join(lines))
        lines = []
        if ev is not None:
            events.append(ev)
            if stop_when(ev):
                break
    return events


def _check_call_events(events: list[dict[str, Any]]) -> None:
    validate = _validator("CallEvent")
    for event in events:
        validate(event)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "call.started"
    assert events[-1]["type"] == "call.ended"


def test_call_feed_events_conform(gateway: BackgroundGateway, calls: Calls) -> None:
    with requests.get(
        f"{gateway.http}/v1/calls/{DONE_SID}/events",
        headers=ADMIN,
        stream=True,
        timeout=TIMEOUT_S,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].split(";")[0] == "text/event-stream"
        events = _read_sse(resp, lambda ev: False)  # the feed of a finished call ends by itself
    assert all(ev.id == ev.data["seq"] and ev.type == ev.data["type"] for ev in events)
    _check_call_events([ev.data for ev in events])
    types = {ev.type for ev in events}
    assert {"turn.partial", "turn.final", "transcript.utterance"} <= types
    # Resume: the events after Last-Event-ID, or `after` for clients that cannot set headers.
    for headers, params in (({**ADMIN, "Last-Event-ID": "3"}, {}), (ADMIN, {"after": "3"})):
        with requests.get(
            f"{gateway.http}/v1/calls/{calls.done}/events",
            headers=headers,
            params=params,
            stream=True,
            timeout=TIMEOUT_S,
        ) as resp:
            resumed = _read_sse(resp, lambda ev: False)
        assert [ev.data for ev in resumed] == [ev.data for ev in events[3:]]


def test_websocket_frames_conform(gateway: BackgroundGateway, calls: Calls) -> None:
    async def frames(query: str) -> tuple[list[dict[str, Any]], int | None]:
        url = f"{gateway.http}/v1/calls/{calls.done}/live?access_token={ADMIN_TOKEN}{query}"
        got: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                got.append(json.loads(msg.data))
            return got, ws.close_code

    got, code = gateway.run(frames(""))
    assert code == 1000
    _check_call_events(got)
    resumed, code = gateway.run(frames("&after=2"))
    assert code == 1000 and resumed == got[2:]


def test_firehose_events_conform(gateway: BackgroundGateway, calls: Calls) -> None:
    last = gateway.run(_last_gseq(gateway))
    assert last > 0
    validate = _validator("CallEvent")
    with requests.get(
        f"{gateway.http}{FIREHOSE}",
        headers={**ADMIN, "Last-Event-ID": "0"},
        stream=True,
        timeout=TIMEOUT_S,  # between bytes: the read below stops at the last event published
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].split(";")[0] == "text/event-stream"
        events = _read_sse(resp, lambda ev: ev.id is not None and ev.id >= last)
    ids = [ev.id for ev in events]
    # In order, without repeats, up to the last one published; a call deleted by another test
    # has had its events removed from the buffer (retention), hence no check for gaps.
    assert ids == sorted(set(ids)) and ids[-1] == last
    for ev in events:
        validate(ev.data)
        assert ev.type == ev.data["type"]
    assert calls.done in {ev.data["call_id"] for ev in events if ev.type == "call.ended"}
    assert calls.live in {ev.data["call_id"] for ev in events if ev.type == "call.started"}


async def _last_gseq(gateway: BackgroundGateway) -> int:
    assert gateway.gw is not None
    return gateway.gw.app[HUB].last_gseq


def test_firehose_errors_are_documented(gateway: BackgroundGateway) -> None:
    # Only the quick answers of the firehose go through schemathesis: they end at once.
    op = SCHEMA[FIREHOSE]["GET"]
    for headers, status in (
        ({"Last-Event-ID": "-1"}, 400),
        ({"Last-Event-ID": "x"}, 400),
    ):
        resp = op.Case(headers=headers).call_and_validate(
            base_url=gateway.http, headers=ADMIN, timeout=TIMEOUT_S
        )
        assert resp.status_code == status
    resp = op.Case().call_and_validate(base_url=gateway.http, timeout=TIMEOUT_S)  # no token
    assert resp.status_code == 401


async def test_firehose_resume_gap_names_the_oldest_event(tmp_path: Path) -> None:
    # Was: "oldest" held the newest id. Now: the first id replayed (the oldest still buffered).
    settings = settings_for(
        tmp_path,
        api={"tokens": [READ_TOKEN]},
        live={"firehose_buffer": 100, "keepalive_s": 0.2},
    )
    async with running_gateway(settings, hello_engine()) as gw:
        for i in range(12):
            await send_messages(gw.ws(), call_messages(f"CA{i:032d}", 1.0))
        await gw.idle()
        hub = gw.app[HUB]
        # Every event published (a finished call's last events may trail its end by a moment).
        seen = [-1, -2]
        while seen[-1] != seen[-2]:
            await asyncio.sleep(0.05)
            seen.append(hub.last_gseq)
        last = seen[-1]
        assert last > 100
        events: list[SseEvent] = []
        buffer = ""
        headers = {"Authorization": f"Bearer {READ_TOKEN}", "Last-Event-ID": "1"}
        async with (
            asyncio.timeout(10),
            aiohttp.ClientSession() as session,
            session.get(f"{gw.http}{FIREHOSE}", headers=headers) as resp,
        ):
            async for raw in resp.content.iter_any():
                buffer += raw.decode()
                events = _parse_sse(buffer)
                if events and (events[-1].id or 0) >= last:
                    break
    gap, first = events[0], events[1]
    assert (gap.type, gap.id) == ("error", None)
    _validator("SseError")(gap.data)
    assert gap.data == {"reason": "resume_gap", "oldest": first.id}
    assert first.id == last - 100 + 1
    assert [ev.id for ev in events[1:]] == list(range(first.id, last + 1))
