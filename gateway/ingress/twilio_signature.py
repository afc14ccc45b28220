"""``X-Twilio-Signature``: compute and validate, sans-I/O (reference notes, section 1.5).

Twilio signs each request with ``base64(HMAC(auth_token, url + sorted params))``, HMAC-SHA1 by
default and HMAC-SHA256 when the request carries ``X-Twilio-Webhooks-Signature-Settings:
algorithm=HMAC_SHA256``. For the Media Streams WebSocket upgrade the URL is the ``wss://`` URL
exactly as written in the TwiML, with no body and no parameters.

Whoever validates must rebuild the URL Twilio signed, which a server behind a TLS-terminating proxy
does not see: :meth:`TwilioSignatureValidator.candidate_urls` lists every plausible spelling (the
configured public URL, ``X-Forwarded-Proto``/``X-Forwarded-Host``, the request's own ``Host``;
each with and without the default port, ``https``/``http`` mapped to ``wss``/``ws`` for a
WebSocket; query string kept, or moved into the parameters) and a signature is valid when it
matches any of them. All comparisons run in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

Algorithm = Literal["sha1", "sha256"]
Params = Mapping[str, str | Sequence[str]]

SIGNATURE_HEADER = "X-Twilio-Signature"
SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def _signing_payload(url: str, params: Params | None) -> bytes:
    parts = [url]
    for key in sorted(params or {}):
        value = (params or {})[key]
        values = [value] if isinstance(value, str) else list(value)
        for item in sorted(values):
            parts.append(key + item)
    return "".join(parts).encode("utf-8")


def compute_signature(
    auth_token: str, url: str, params: Params | None = None, *, algorithm: Algorithm = "sha1"
) -> str:
    """The ``X-Twilio-Signature`` value Twilio would send for ``url`` and POST ``params``."""
    digest = hashlib.sha1 if algorithm == "sha1" else hashlib.sha256
    mac = hmac.new(auth_token.encode("utf-8"), _signing_payload(url, params), digest)
    return base64.b64encode(mac.digest()).decode("ascii")


def algorithm_of(settings_header: str | None) -> Algorithm:
    """The HMAC named by ``X-Twilio-Webhooks-Signature-Settings`` (SHA1 when absent)."""
    if settings_header:
        for part in settings_header.split(","):
            key, _, value = part.partition("=")
            if key.strip().lower() == "algorithm" and "256" in value:
                return "sha256"
    return "sha1"


class SignatureFailure(Enum):
    """Why a request was refused; the value is the metric label."""

    MISSING = "missing_signature"
    MISMATCH = "bad_signature"


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a validator needs to know about one HTTP request (the shell fills it in).

    ``headers`` must be looked up case-insensitively (aiohttp's ``CIMultiDictProxy`` is).
    """

    scheme: str
    host: str
    path: str
    query_string: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Params = field(default_factory=dict)
    websocket: bool = False


def _with_and_without_port(url: str) -> list[str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = _DEFAULT_PORTS.get(parts.scheme)
    port = parts.port or default
    with_port = urlunsplit(parts._replace(netloc=f"{host}:{port}")) if port else url
    without = (
        urlunsplit(parts._replace(netloc=host)) if parts.port in (None, default) else with_port
    )
    out = [url]
    for candidate in (without, with_port):
        if candidate not in out:
            out.append(candidate)
    return out


class TwilioSignatureValidator:
    """Validates ``X-Twilio-Signature`` for one auth token (see module docstring).

    ``public_url`` (e.g. ``https://gw.example.com``) is the base Twilio was told to use; when
    ``trust_forwarded`` the proxy headers ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` are used
    too. Both only add candidate URLs: a forged header cannot make a wrong signature pass.
    """

    def __init__(
        self, auth_token: str, *, public_url: str = "", trust_forwarded: bool = True
    ) -> None:
        if not auth_token:
            raise ValueError("an auth token is required to validate signatures")
        self._token = auth_token
        self._public = urlsplit(public_url) if public_url else None
        self._trust_forwarded = trust_forwarded

    def candidate_urls(self, request: SignedRequest) -> list[str]:
        """Every URL spelling the request could have been signed under, most likely first."""
        bases: list[tuple[str, str]] = []
        if self._public is not None and self._public.netloc:
            bases.append((self._public.scheme or "https", self._public.netloc))
        headers = request.headers
        if self._trust_forwarded:
            proto = (headers.get("X-Forwarded-Proto") or "").split(",")[0].strip().lower()
            fwd_host = (headers.get("X-Forwarded-Host") or "").split(",")[0].strip()
            if proto or fwd_host:
                bases.append((proto or request.scheme, fwd_host or request.host))
        bases.append((request.scheme, request.host))
        query = f"?{request.query_string}" if request.query_string else ""
        urls: list[str] = []
        for scheme, host in bases:
            scheme = scheme.lower()
            schemes = (
                [_WS_SCHEME.get(scheme, scheme)]
                if request.websocket
                else [_HTTP_SCHEME.get(scheme, scheme)]
            )
            for s in schemes:
                for q in (query, "") if query else ("",):
                    for url in _with_and_without_port(f"{s}://{host}{request.path}{q}"):
                        if url not in urls:
                            urls.append(url)
        return urls

    def check(self, request: SignedRequest) -> SignatureFailure | None:
        """None when the signature is valid, else why not."""
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return SignatureFailure.MISSING
        algorithm = algorithm_of(request.headers.get(SETTINGS_HEADER))
        given = signature.strip().encode("ascii", "replace")
        # A query string moved into the params is the other accepted form for the upgrade.
        query_params: dict[str, list[str]] = {}
        for key, value in parse_qsl(request.query_string, keep_blank_values=True):
            query_params.setdefault(key, []).append(value)
        merged: dict[str, str | Sequence[str]] = dict(request.params)
        for key, values in query_params.items():
            merged[key] = [*_values(merged.get(key)), *values]
        ok = False
        for url in self.candidate_urls(request):
            params = merged if "?" not in url else request.params
            expected = compute_signature(self._token, url, params, algorithm=algorithm)
            # No early exit: the time taken does not depend on which candidate matched.
            ok |= hmac.compare_digest(expected.encode("ascii"), given)
        return None if ok else SignatureFailure.MISMATCH


def _values(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
