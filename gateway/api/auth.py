"""Bearer-token auth for the API and live feeds, and CORS for dashboards on other origins.

Tokens come from config (``api.tokens`` read-only, ``api.admin_tokens`` read and delete), in the
``Authorization: Bearer`` header or, for browsers' EventSource/WebSocket that cannot set headers,
the ``access_token`` query parameter. With no token configured at all the API answers loopback
clients only (transcripts and phone numbers are personal data): the peer address must be loopback
and the Host header must name a loopback address or ``localhost`` (against DNS rebinding).
Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping
from enum import IntEnum

from aiohttp import hdrs, web

from gateway.config import ApiSettings

CORS_ORIGIN = web.RequestKey("cors_origin", str)
"""The allowed Origin of this request, for handlers that send their headers themselves (SSE)."""


class Access(IntEnum):
    READ = 1
    ADMIN = 2


def _matches(given: str, tokens: list[str]) -> bool:
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given.encode(), token.encode())
    return ok


def _is_loopback_ip(value: str) -> bool:
    try:
        return ipaddress.ip_address(value).is_loopback
    except ValueError:
        return False


def _is_loopback_host(headers: Mapping[str, str]) -> bool:
    """Whether the Host header names a loopback address or ``localhost``.

    A loopback peer is not enough: a web page can rebind its own DNS name to 127.0.0.1 and read the
    API from the user's browser (DNS rebinding); its requests then carry that name as Host.
    """
    host = headers.get(hdrs.HOST)
    if not host:
        return True  # no browser sends a request without Host
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_ip(name)


class ApiAuth:
    """Checks a request's token against the configured ones (see module docstring)."""

    def __init__(self, settings: ApiSettings) -> None:
        self._read = [t.get_secret_value() for t in settings.tokens if t.get_secret_value()]
        self._admin = [t.get_secret_value() for t in settings.admin_tokens if t.get_secret_value()]

    @property
    def open_to_loopback(self) -> bool:
        return not self._read and not self._admin

    def require(self, request: web.Request, level: Access = Access.READ) -> None:
        """Raise 401 (no/unknown token), 403 (not enough rights, or not loopback)."""
        if self.open_to_loopback:
            if not (_is_loopback_ip(request.remote or "") and _is_loopback_host(request.headers)):
                raise web.HTTPForbidden(
                    text="the API answers loopback clients only until api.tokens is set\n"
                )
            return
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given:
            given = request.query.get("access_token", "")
        if not given:
            raise web.HTTPUnauthorized(
                text="a bearer token is required\n", headers={"WWW-Authenticate": "Bearer"}
            )
        if _matches(given, self._admin):
            return
        if _matches(given, self._read):
            if level is Access.ADMIN:
                raise web.HTTPForbidden(text="this needs an admin token\n")
            return
        raise web.HTTPUnauthorized(
            text="invalid token\n", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def cors_middleware(origins: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Allow the configured origins (``*`` for any) to call the API from a browser."""
    allowed = set(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        ok = origin is not None and ("*" in allowed or origin in allowed)
        if ok and origin is not None:
            request[CORS_ORIGIN] = origin  # streaming handlers set it before prepare()
        if (
            request.method == "OPTIONS"
            and ok
            and request.headers.get("Access-Control-Request-Method")
        ):
            resp: web.StreamResponse = web.Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = "GET, DELETE, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID"
            resp.headers["Access-Control-Max-Age"] = "600"
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                resp = exc
                if ok and origin is not None:
                    exc.headers["Access-Control-Allow-Origin"] = origin
                    exc.headers["Vary"] = "Origin"
                raise
        if ok and origin is not None and not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        return resp

    return cors
