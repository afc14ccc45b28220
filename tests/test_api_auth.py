"""Who may call the API: bearer tokens (read, admin), ``access_token``, loopback-only, and CORS.

The walk covers every route the app's router has under ``/v1`` (read from ``app.router``, so a route
added later is walked too) with every method it answers, HEAD included, on a real gateway with a
finished call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.api.auth import Access, ApiAuth
from gateway.api.routes import STORE
from gateway.app import purge_old_calls
from gateway.config import ApiSettings
from tests.gateway_server import (
    Gateway,
    call_messages,
    hello_engine,
    poll_until,
    running_gateway,
    send_messages,
    settings_for,
)

READ_TOKEN = "auth-read-token-0123456789"
ADMIN_TOKEN = "auth-admin-token-0123456789"
CALL_SID = "CA000000000000000000000000000auth1"
UNKNOWN = "CA000000000000000000000000000none0"
DASH = "https://dash.example.com"
OPEN = "/v1/openapi.json"


@asynccontextmanager
async def _gateway(tmp_path: Path, **api: Any) -> AsyncIterator[Gateway]:
    """A gateway with one finished call; feeds notice a client that left within 0.2 s."""
    settings = settings_for(tmp_path, api=api, live={"keepalive_s": 0.2})
    async with running_gateway(settings, hello_engine()) as gw:
        closed = await send_messages(gw.ws(), call_messages(CALL_SID, 1.0))
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        yield gw


def _api_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every /v1 route that needs a token, HEAD included."""
    out = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/v1") and path != OPEN:
            out.append((route.method, path))
    return sorted(out)


async def _status(
    gw: Gateway,
    method: str,
    path: str,
    *,
    token: str | None = None,
    query_token: str | None = None,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """The response's status and headers only: feeds are left at once (the firehose never ends)."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    params = {"access_token": query_token} if query_token is not None else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.http + path, headers=hdrs, params=params) as resp,
    ):
        return resp


def test_the_walk_covers_every_api_route(tmp_path: Path) -> None:
    from gateway.app import make_app

    routes = _api_routes(make_app(settings_for(tmp_path)))
    assert {path for _, path in routes} == {
        "/v1/calls",
        "/v1/calls/{id}",
        "/v1/calls/{id}/transcript",
        "/v1/calls/{id}/events",
        "/v1/calls/{id}/live",
        "/v1/events",
    }
    assert ("DELETE", "/v1/calls/{id}") in routes
    assert ("HEAD", "/v1/events") in routes


async def test_every_api_route_needs_a_token(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN], admin_tokens=[ADMIN_TOKEN]) as gw:
        routes = _api_routes(gw.app)
        assert len(routes) >= 13  # 6 GET (+ 6 HEAD) and DELETE
        for method, template in routes:
            path = template.replace("{id}", CALL_SID)
            where = f"{method} {path}"

            none = await _status(gw, method, path)
            assert none.status == 401, where
            assert none.headers["WWW-Authenticate"] == "Bearer", where
            for wrong in (
                await _status(gw, method, path, token="not-a-token"),
                await _status(gw, method, path, query_token="not-a-token"),
                await _status(gw, method, path, token=READ_TOKEN + "x"),
                await _status(gw, method, path, headers={"Authorization": "Bearer "}),
            ):
                assert wrong.status == 401, where
                assert wrong.headers["WWW-Authenticate"].startswith("Bearer"), where

            # A read token reads; it may not delete. The query parameter works like the header.
            by_header = await _status(gw, method, path, token=READ_TOKEN)
            by_query = await _status(gw, method, path, query_token=READ_TOKEN)
            expected = 403 if method == "DELETE" else by_header.status
            assert by_header.status == by_query.status == expected, where
            assert by_header.status not in (401, 500), where
            if method != "DELETE":
                assert by_header.status != 403, where

            # An admin token may do everything (DELETE an unknown call: 404, nothing deleted).
            admin_path = template.replace("{id}", UNKNOWN) if method == "DELETE" else path
            for admin in (
                await _status(gw, method, admin_path, token=ADMIN_TOKEN),
                await _status(gw, method, admin_path, query_token=ADMIN_TOKEN),
            ):
                assert admin.status not in (401, 403, 500), where
        # The statuses the walk saw with a read token, for the record.
        got = {
            (m, p): (await _status(gw, m, p.replace("{id}", CALL_SID), token=READ_TOKEN)).status
            for m, p in routes
        }
        assert got[("GET", "/v1/calls")] == got[("GET", "/v1/calls/{id}")] == 200
        assert got[("GET", "/v1/calls/{id}/transcript")] == 200
        assert got[("GET", "/v1/calls/{id}/events")] == got[("GET", "/v1/events")] == 200
        assert got[("GET", "/v1/calls/{id}/live")] == 400  # a plain GET is not an upgrade
        assert got[("DELETE", "/v1/calls/{id}")] == 403
        # The document stays open.
        assert (await _status(gw, "GET", OPEN)).status == 200


async def test_head_of_a_feed_is_headers_only(tmp_path: Path) -> None:
    # Was: the feed's events written after the HEAD response's headers, which broke the connection
    # for the next request on it (and the firehose never ended).
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        auth = {"Authorization": f"Bearer {READ_TOKEN}"}
        connector = aiohttp.TCPConnector(limit=1)  # one connection, reused for every request
        async with aiohttp.ClientSession(connector=connector, headers=auth) as session:
            for path in (f"/v1/calls/{CALL_SID}/events", "/v1/events"):
                async with session.head(gw.http + path) as head:
                    assert head.status == 200
                    assert head.headers["Content-Type"].startswith("text/event-stream")
                async with session.get(f"{gw.http}/v1/calls/{CALL_SID}") as after:
                    assert after.status == 200
                    assert (await after.json())["state"] == "ended"
            async with session.head(gw.http + "/v1/events", headers={"Last-Event-ID": "x"}) as bad:
                assert bad.status == 400


async def test_bearer_scheme_is_case_insensitive_and_other_schemes_are_ignored(
    tmp_path: Path,
) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        ok = await _status(
            gw, "GET", "/v1/calls", headers={"Authorization": f"bearer {READ_TOKEN}"}
        )
        assert ok.status == 200
        # Another scheme is not a bearer token: the query parameter is used instead.
        basic = await _status(
            gw, "GET", "/v1/calls", headers={"Authorization": "Basic Zm9vOmJhcg=="}
        )
        assert basic.status == 401
        both = await _status(
            gw,
            "GET",
            "/v1/calls",
            headers={"Authorization": "Basic Zm9vOmJhcg=="},
            query_token=READ_TOKEN,
        )
        assert both.status == 200


async def test_admin_token_deletes_and_read_token_cannot(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN], admin_tokens=[ADMIN_TOKEN]) as gw:
        path = f"/v1/calls/{CALL_SID}"
        assert (await _status(gw, "DELETE", path, token=READ_TOKEN)).status == 403
        assert (await _status(gw, "GET", path, token=READ_TOKEN)).status == 200
        assert (await _status(gw, "DELETE", path, query_token=ADMIN_TOKEN)).status == 204
        assert (await _status(gw, "GET", path, token=ADMIN_TOKEN)).status == 404


async def test_a_call_still_being_saved_cannot_be_deleted_yet(tmp_path: Path) -> None:
    # The call has ended but its finish hooks (last events, transcript file, webhooks) are still
    # running: DELETE says 409 and when to retry, instead of deleting what those writes would
    # then bring back. Once they are done, DELETE removes it for good.
    settings = settings_for(tmp_path, api={"admin_tokens": [ADMIN_TOKEN]})
    async with running_gateway(settings, hello_engine()) as gw:
        release = asyncio.Event()
        gw.registry.on_finished(lambda live: release.wait())
        closed = await send_messages(gw.ws(), call_messages(CALL_SID, 1.0))
        assert (closed.code, closed.reason) == (1000, "stop")
        call = gw.registry.get(CALL_SID)
        assert call is not None
        await poll_until(lambda: call.state.value == "ended")
        path = f"/v1/calls/{CALL_SID}"
        early = await _status(gw, "DELETE", path, token=ADMIN_TOKEN)
        assert early.status == 409 and early.headers["Retry-After"] == "1"
        release.set()
        await gw.idle()
        assert (await _status(gw, "DELETE", path, token=ADMIN_TOKEN)).status == 204
        assert (await _status(gw, "GET", path, token=ADMIN_TOKEN)).status == 404
        assert not await asyncio.to_thread(
            (gw.data_dir / "transcripts" / f"{call.call_id}.json").exists
        )


async def test_retention_removes_a_call_from_the_store_memory_and_disk(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, api={"admin_tokens": [ADMIN_TOKEN]}, recording={"enabled": True}
    )
    async with running_gateway(settings, hello_engine()) as gw:
        closed = await send_messages(gw.ws(), call_messages(CALL_SID, 1.0))
        assert (closed.code, closed.reason) == (1000, "stop")
        await gw.idle()
        call = gw.registry.get(CALL_SID)
        assert call is not None
        files = [
            gw.data_dir / "transcripts" / f"{call.call_id}.json",
            Path(call.metadata["recording"]),
        ]
        assert all(await asyncio.gather(*(asyncio.to_thread(f.exists) for f in files)))
        assert await purge_old_calls(gw.app, gw.app[STORE], days=0) == 1
        path = f"/v1/calls/{CALL_SID}"
        assert (await _status(gw, "GET", path, token=ADMIN_TOKEN)).status == 404
        assert gw.registry.get(CALL_SID) is None
        assert not any(await asyncio.gather(*(asyncio.to_thread(f.exists) for f in files)))


async def test_huge_resume_point_is_a_bad_request(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        path = f"/v1/calls/{CALL_SID}/events"
        for value in (str(2**63), "1" + "0" * 20):
            resp = await _status(
                gw, "GET", path, token=READ_TOKEN, headers={"Last-Event-ID": value}
            )
            assert resp.status == 400, value


async def test_websocket_feed_takes_the_token_as_access_token(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        url = f"{gw.http}/v1/calls/{CALL_SID}/live"
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 401
            with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
                await session.ws_connect(url, params={"access_token": "nope"})
            assert wrong.value.status == 401
            async with session.ws_connect(url, params={"access_token": READ_TOKEN}) as ws:
                frames = [msg async for msg in ws if msg.type is aiohttp.WSMsgType.TEXT]
            assert frames and ws.close_code == 1000


# -- no token configured: loopback only -----------------------------------------------------------


def _request(peer: str, host: str | None = "127.0.0.1:8080") -> web.Request:
    """A request as the server would see it from ``peer`` (the socket's peer address)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    headers = {"Host": host} if host is not None else {}
    return make_mocked_request("GET", "/v1/calls", headers=headers, transport=transport)


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.3.4.5", "::1"])
def test_no_tokens_answers_loopback_clients(peer: str) -> None:
    auth = ApiAuth(ApiSettings())
    assert auth.open_to_loopback
    request = _request(peer)
    assert request.remote == peer
    auth.require(request)
    auth.require(request, Access.ADMIN)  # loopback may delete too


@pytest.mark.parametrize("peer", ["203.0.113.7", "10.0.0.2", "192.168.1.20", "2001:db8::1", ""])
def test_no_tokens_refuses_other_clients(peer: str) -> None:
    auth = ApiAuth(ApiSettings())
    with pytest.raises(web.HTTPForbidden):
        auth.require(_request(peer))


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8080", "LOCALHOST.", "127.0.0.1", "[::1]:8080", "a.localhost", None],
)
def test_no_tokens_accepts_loopback_host_names(host: str | None) -> None:
    ApiAuth(ApiSettings()).require(_request("127.0.0.1", host))


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8080", "10.0.0.2:8080"])
def test_no_tokens_refuses_other_host_names_even_from_loopback(host: str) -> None:
    # DNS rebinding: a web page whose name now resolves to 127.0.0.1, read from the user's browser.
    with pytest.raises(web.HTTPForbidden):
        ApiAuth(ApiSettings()).require(_request("127.0.0.1", host))


def test_an_empty_token_is_no_token() -> None:
    assert ApiAuth(ApiSettings(tokens=("",), admin_tokens=("",))).open_to_loopback


async def test_no_tokens_over_a_real_socket(tmp_path: Path) -> None:
    async with _gateway(tmp_path) as gw:
        for method, template in _api_routes(gw.app):
            path = template.replace("{id}", UNKNOWN if method == "DELETE" else CALL_SID)
            resp = await _status(gw, method, path)
            assert resp.status not in (401, 403, 500), f"{method} {path}"
            # From loopback, but for a name that is not (DNS rebinding): refused.
            rebound = await _status(gw, method, path, headers={"Host": "rebound.example:80"})
            assert rebound.status == 403, f"{method} {path}"


# -- CORS ----------------------------------------------------------------------------------------


async def test_cors_for_the_configured_origin(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN], cors_origins=[DASH]) as gw:
        origin = {"Origin": DASH}
        ok = await _status(gw, "GET", "/v1/calls", token=READ_TOKEN, headers=origin)
        assert ok.status == 200
        assert ok.headers["Access-Control-Allow-Origin"] == DASH
        assert "Origin" in ok.headers["Vary"]
        # Errors too, so the page can tell a bad token from a network failure.
        refused = await _status(gw, "GET", "/v1/calls", headers=origin)
        assert refused.status == 401
        assert refused.headers["Access-Control-Allow-Origin"] == DASH
        missing = await _status(gw, "GET", f"/v1/calls/{UNKNOWN}", token=READ_TOKEN, headers=origin)
        assert missing.status == 404
        assert missing.headers["Access-Control-Allow-Origin"] == DASH

        for path in ("/v1/calls", f"/v1/calls/{CALL_SID}"):
            preflight = await _status(
                gw,
                "OPTIONS",
                path,
                headers={
                    **origin,
                    "Access-Control-Request-Method": "DELETE",
                    "Access-Control-Request-Headers": "authorization, last-event-id",
                },
            )
            assert preflight.status == 204
            assert preflight.headers["Access-Control-Allow-Origin"] == DASH
            methods = {
                m.strip() for m in preflight.headers["Access-Control-Allow-Methods"].split(",")
            }
            assert {"GET", "DELETE"} <= methods
            allowed = {
                h.strip().lower()
                for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
            }
            assert {"authorization", "last-event-id"} <= allowed

        # The feeds (streamed responses) carry the header as well.
        for path in (f"/v1/calls/{CALL_SID}/events", "/v1/events"):
            feed = await _status(gw, "GET", path, token=READ_TOKEN, headers=origin)
            assert feed.status == 200
            assert feed.headers["Content-Type"].startswith("text/event-stream")
            assert feed.headers["Access-Control-Allow-Origin"] == DASH


async def test_no_cors_for_other_origins(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN], cors_origins=[DASH]) as gw:
        for origin in ("https://evil.example.com", "https://dash.example.com.evil.net", "null"):
            headers = {"Origin": origin}
            resp = await _status(gw, "GET", "/v1/calls", token=READ_TOKEN, headers=headers)
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers
            feed = await _status(gw, "GET", "/v1/events", token=READ_TOKEN, headers=headers)
            assert "Access-Control-Allow-Origin" not in feed.headers
            preflight = await _status(
                gw,
                "OPTIONS",
                "/v1/calls",
                headers={**headers, "Access-Control-Request-Method": "GET"},
            )
            assert preflight.status != 204
            assert "Access-Control-Allow-Origin" not in preflight.headers
            assert "Access-Control-Allow-Methods" not in preflight.headers
        # Without an Origin (not a browser's cross-origin request): no CORS headers at all.
        plain = await _status(gw, "GET", "/v1/calls", token=READ_TOKEN)
        assert "Access-Control-Allow-Origin" not in plain.headers


async def test_no_cors_unless_configured(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        resp = await _status(gw, "GET", "/v1/calls", token=READ_TOKEN, headers={"Origin": DASH})
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_wildcard_echoes_any_origin(tmp_path: Path) -> None:
    async with _gateway(tmp_path, tokens=[READ_TOKEN], cors_origins=["*"]) as gw:
        other = "https://anything.example.org"
        resp = await _status(gw, "GET", "/v1/calls", token=READ_TOKEN, headers={"Origin": other})
        assert resp.headers["Access-Control-Allow-Origin"] == other


async def test_metrics_and_health_need_a_token_when_not_open(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, api={"tokens": ["reader-token"], "open_metrics": False})
    async with running_gateway(settings, hello_engine()) as gw, aiohttp.ClientSession() as s:
        for path in ("/metrics", "/healthz", "/readyz"):
            async with s.get(f"{gw.http}{path}") as resp:
                assert resp.status == 401, path
            headers = {"Authorization": "Bearer reader-token"}
            async with s.get(f"{gw.http}{path}", headers=headers) as resp:
                assert resp.status == 200, path


async def test_a_finished_calls_transcript_is_built_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Building and encoding an hours-long call's transcript takes seconds: at call end (event,
    # file) and for GET /transcript of a finished call it happens in worker threads.
    import threading

    from gateway.api import routes
    from gateway.outputs import transcript_files

    built_in: list[str] = []
    real = transcript_files.call_document

    def spy(call: Any) -> dict[str, Any]:
        built_in.append(threading.current_thread().name)
        return real(call)

    monkeypatch.setattr(transcript_files, "call_document", spy)
    monkeypatch.setattr(routes, "call_document", spy)
    async with _gateway(tmp_path, tokens=[READ_TOKEN]) as gw:
        assert len(built_in) >= 2  # the call.ended event's document and the transcript file
        resp = await _status(gw, "GET", f"/v1/calls/{CALL_SID}/transcript", token=READ_TOKEN)
        assert resp.status == 200
    assert len(built_in) >= 3
    assert threading.main_thread().name not in built_in, built_in
