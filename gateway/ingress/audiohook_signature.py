"""AudioHook upgrade authentication: ``X-API-KEY`` and the HTTP message signature, sans-I/O.

Genesys AudioHook (reference notes, section 3.1) sends on the WebSocket upgrade the headers
``Audiohook-Organization-Id``, ``Audiohook-Session-Id``, ``Audiohook-Correlation-Id`` and
``X-API-KEY``; when the integration has a client secret it also signs the request with an HTTP
message signature (draft-ietf-httpbis-message-signatures, close to RFC 9421)::

    Signature-Input: sig1=("@request-target" "@authority" "audiohook-organization-id"
        "audiohook-session-id" "audiohook-correlation-id" "x-api-key");keyid="<API key>";
        nonce="<nonce>";alg="hmac-sha256";created=<unix s>;expires=<unix s>
    Signature: sig1=:<base64 HMAC-SHA256>:

The HMAC key is the **base64-decoded** client secret; the signed text is one line
``"<component>": <value>`` per component, then ``"@signature-params": <inner list and params as
sent>``, joined with ``\\n``.

:class:`AudioHookAuthenticator` applies the reference server's policy: the API key must be one
of the configured keys; a key configured with a secret must sign (``keyid`` = the API key, every
required component covered, ``alg`` hmac-sha256, ``created`` no older than ``max_age_s`` and
not in the future, ``expires`` not passed, both with ``clock_skew_s`` of slack, a nonce of at
least ``min_nonce_length`` characters). Every comparison of secret material runs in constant
time. Nothing here sleeps: the shell adds the constant minimum delay before it answers a failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

API_KEY_HEADER = "X-API-KEY"
ORGANIZATION_HEADER = "Audiohook-Organization-Id"
SESSION_HEADER = "Audiohook-Session-Id"
CORRELATION_HEADER = "Audiohook-Correlation-Id"
REQUIRED_COMPONENTS: tuple[str, ...] = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
ALGORITHM = "hmac-sha256"

_LABEL = r"[a-z*][a-z0-9_\-.*]*"
_INPUT = re.compile(rf"\s*({_LABEL})=\(([^)]*)\)((?:;[^,]*)?)\s*(?:,|$)")
_SIG = re.compile(rf"\s*({_LABEL})=:([A-Za-z0-9+/=]*):\s*(?:,|$)")
_PARAM = re.compile(r';\s*([a-z*][a-z0-9_\-.*]*)=("(?:[^"\\]|\\.)*"|-?[0-9]+)')
_ITEM = re.compile(r'"([^"]*)"')


class AuthFailure(Enum):
    """Why an upgrade was refused; the value is the ``streams_rejected`` metric reason."""

    MISSING_API_KEY = "missing_api_key"
    BAD_API_KEY = "bad_api_key"
    MISSING_SIGNATURE = "missing_signature"
    MALFORMED_SIGNATURE = "malformed_signature"
    BAD_KEYID = "bad_keyid"
    BAD_ALGORITHM = "bad_algorithm"
    MISSING_COMPONENT = "missing_component"
    SHORT_NONCE = "short_nonce"
    SIGNATURE_EXPIRED = "signature_expired"
    SIGNATURE_FROM_FUTURE = "signature_from_future"
    BAD_SIGNATURE = "bad_signature"
    UNSIGNED_REFUSED = "unsigned_refused"


@dataclass(frozen=True, slots=True)
class SignatureInput:
    """One parsed ``Signature-Input`` member: its label, components and parameters.

    ``params_text`` is the member's value exactly as sent (inner list plus parameters): it is
    what ``"@signature-params"`` covers.
    """

    label: str
    components: tuple[str, ...]
    params: dict[str, str | int]
    params_text: str


class SignatureSyntaxError(ValueError):
    """A ``Signature-Input`` or ``Signature`` header that cannot be parsed."""


def parse_signature_input(header: str) -> dict[str, SignatureInput]:
    """``Signature-Input`` -> label -> :class:`SignatureInput`. Raises SignatureSyntaxError."""
    out: dict[str, SignatureInput] = {}
    pos = 0
    text = header.strip()
    while pos < len(text):
        m = _INPUT.match(text, pos)
        if m is None:
            raise SignatureSyntaxError("Signature-Input is not a dictionary of inner lists")
        label, inner, params_part = m.group(1), m.group(2), m.group(3)
        components = tuple(_ITEM.findall(inner))
        if _ITEM.sub("", inner).strip():
            raise SignatureSyntaxError("Signature-Input components must be quoted strings")
        params: dict[str, str | int] = {}
        rest = params_part.strip()
        for pm in _PARAM.finditer(rest):
            raw = pm.group(2)
            params[pm.group(1)] = raw[1:-1] if raw.startswith('"') else int(raw)
        if _PARAM.sub("", rest).strip():
            raise SignatureSyntaxError("Signature-Input has malformed parameters")
        out[label] = SignatureInput(label, components, params, f"({inner}){params_part.strip()}")
        pos = m.end()
    if not out:
        raise SignatureSyntaxError("Signature-Input is empty")
    return out


def parse_signature(header: str) -> dict[str, bytes]:
    """``Signature`` -> label -> signature bytes. Raises SignatureSyntaxError."""
    out: dict[str, bytes] = {}
    pos = 0
    text = header.strip()
    while pos < len(text):
        m = _SIG.match(text, pos)
        if m is None:
            raise SignatureSyntaxError("Signature is not a dictionary of byte sequences")
        try:
            out[m.group(1)] = base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError):
            raise SignatureSyntaxError("Signature value is not base64") from None
        pos = m.end()
    if not out:
        raise SignatureSyntaxError("Signature is empty")
    return out


def signature_base(values: Mapping[str, str], components: Sequence[str], params_text: str) -> str:
    """The text that is signed: one line per component, then ``"@signature-params"``."""
    lines = [f'"{name}": {values[name]}' for name in components]
    lines.append(f'"@signature-params": {params_text}')
    return "\n".join(lines)


def compute_signature(secret_b64: str, base: str) -> bytes:
    """HMAC-SHA256 of ``base`` keyed with the base64-decoded client secret."""
    key = base64.b64decode(secret_b64)
    return hmac.new(key, base.encode("utf-8"), hashlib.sha256).digest()


def sign_headers(
    *,
    request_target: str,
    authority: str,
    headers: Mapping[str, str],
    api_key: str,
    secret_b64: str,
    nonce: str,
    created: int,
    expires: int,
    label: str = "sig1",
) -> dict[str, str]:
    """``Signature-Input`` and ``Signature`` as the Genesys client would send them (simulator).

    ``headers`` must hold the three ``Audiohook-*`` headers; the API key is added as signed.
    """
    inner = " ".join(f'"{c}"' for c in REQUIRED_COMPONENTS)
    params_text = (
        f'({inner});keyid="{api_key}";nonce="{nonce}";alg="{ALGORITHM}";'
        f"created={created};expires={expires}"
    )
    values = _component_values(request_target, authority, headers, api_key)
    mac = compute_signature(secret_b64, signature_base(values, REQUIRED_COMPONENTS, params_text))
    return {
        "Signature-Input": f"{label}={params_text}",
        "Signature": f"{label}=:{base64.b64encode(mac).decode('ascii')}:",
    }


def _component_values(
    request_target: str, authority: str, headers: Mapping[str, str], api_key: str
) -> dict[str, str]:
    return {
        "@request-target": request_target,
        "@authority": authority.lower(),
        "audiohook-organization-id": (headers.get(ORGANIZATION_HEADER) or "").strip(),
        "audiohook-session-id": (headers.get(SESSION_HEADER) or "").strip(),
        "audiohook-correlation-id": (headers.get(CORRELATION_HEADER) or "").strip(),
        "x-api-key": api_key,
    }


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """What the authenticator needs of the upgrade request (the shell fills it in).

    ``request_target`` is the path plus ``?query`` as sent; ``authorities`` every host the
    request may have been signed for (Host, a forwarded host, the configured public host), most
    likely first. ``headers`` must be looked up case-insensitively.
    """

    request_target: str
    authorities: tuple[str, ...]
    headers: Mapping[str, str] = field(default_factory=dict)


def parse_key_entries(entries: Iterable[str]) -> dict[str, str]:
    """``"API_KEY"`` or ``"API_KEY:CLIENT_SECRET_BASE64"`` entries -> key -> secret ("" = none).

    Raises ValueError for an empty key or a secret that is not base64.
    """
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, secret = entry.rpartition(":")
        if not sep:
            key, secret = entry, ""
        key, secret = key.strip(), secret.strip()
        if not key:
            raise ValueError("an AudioHook API key entry has an empty key")
        if secret:
            try:
                base64.b64decode(secret, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("an AudioHook client secret is not base64") from None
        out[key] = secret
    return out


class AudioHookAuthenticator:
    """Checks an AudioHook upgrade (see module docstring).

    ``keys`` maps each accepted API key to its base64 client secret ("" = the key alone
    suffices). ``allow_unauthenticated``: with no keys configured, accept every request (for
    development); with keys, it has no effect.
    """

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        max_age_s: float = 10.0,
        clock_skew_s: float = 3.0,
        min_nonce_length: int = 22,
        allow_unauthenticated: bool = False,
    ) -> None:
        self._keys = [(k.encode("utf-8"), s) for k, s in keys.items()]
        self._max_age = max_age_s
        self._skew = clock_skew_s
        self._min_nonce = min_nonce_length
        self._open = allow_unauthenticated and not self._keys

    def check(self, request: UpgradeRequest, now: float) -> AuthFailure | None:
        """None when the request is authentic at unix time ``now``, else why not."""
        if self._open:
            return None
        if not self._keys:
            return AuthFailure.UNSIGNED_REFUSED
        headers = request.headers
        api_key = (headers.get(API_KEY_HEADER) or "").strip()
        if not api_key:
            return AuthFailure.MISSING_API_KEY
        given = api_key.encode("utf-8")
        secret: str | None = None
        for key, key_secret in self._keys:  # no early exit: time does not depend on the match
            if hmac.compare_digest(key, given):
                secret = key_secret
        if secret is None:
            return AuthFailure.BAD_API_KEY
        sig_input = headers.get("Signature-Input")
        sig = headers.get("Signature")
        if not secret:
            return None  # no client secret for this key: unsigned requests are allowed
        if not sig_input or not sig:
            return AuthFailure.MISSING_SIGNATURE
        try:
            inputs = parse_signature_input(sig_input)
            signatures = parse_signature(sig)
        except SignatureSyntaxError:
            return AuthFailure.MALFORMED_SIGNATURE
        label = next((lb for lb in inputs if lb in signatures), None)
        if label is None:
            return AuthFailure.MALFORMED_SIGNATURE
        spec = inputs[label]
        params = spec.params
        if params.get("keyid") != api_key:
            return AuthFailure.BAD_KEYID
        if params.get("alg", ALGORITHM) != ALGORITHM:
            return AuthFailure.BAD_ALGORITHM
        if any(c not in spec.components for c in REQUIRED_COMPONENTS) or any(
            c not in REQUIRED_COMPONENTS for c in spec.components
        ):
            return AuthFailure.MISSING_COMPONENT
        nonce = params.get("nonce")
        if not isinstance(nonce, str) or len(nonce) < self._min_nonce:
            return AuthFailure.SHORT_NONCE
        created, expires = params.get("created"), params.get("expires")
        if not isinstance(created, int) or (expires is not None and not isinstance(expires, int)):
            return AuthFailure.MALFORMED_SIGNATURE
        if created > now + self._skew:
            return AuthFailure.SIGNATURE_FROM_FUTURE
        if created < now - self._max_age - self._skew:
            return AuthFailure.SIGNATURE_EXPIRED
        if isinstance(expires, int) and expires < now - self._skew:
            return AuthFailure.SIGNATURE_EXPIRED
        ok = False
        for authority in request.authorities:
            values = _component_values(request.request_target, authority, headers, api_key)
            base = signature_base(values, spec.components, spec.params_text)
            ok |= hmac.compare_digest(compute_signature(secret, base), signatures[label])
        return None if ok else AuthFailure.BAD_SIGNATURE
