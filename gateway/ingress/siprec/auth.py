"""SIP access control: a source-address allowlist and HTTP digest authentication.

Both are pure functions of their inputs. :class:`DigestAuth` implements RFC 2617 / RFC 7616
digest with ``qop=auth`` (and the RFC 2069 form without qop) for MD5 and SHA-256, with stateless
nonces: ``<issue time hex>.<HMAC-SHA256(secret, issue time)>``, valid for ``nonce_ttl_s`` on the
caller's clock (the ``now`` passed in). Nonce counts are not tracked, so a captured response can
be replayed until its nonce expires; keep the TTL short or use TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.ingress.siprec.message import SipRequest, split_list

__all__ = ["Allowlist", "AuthResult", "DigestAuth", "DigestCredentials"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Allowlist:
    """Source addresses allowed to signal (CIDRs). An empty allowlist allows everyone."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        """Parse ``cidrs`` (``10.0.0.0/8``, ``2001:db8::/32``, an address); ValueError if bad."""
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()
        )

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP address string) is inside one of the networks."""
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)


class AuthResult(StrEnum):
    """The outcome of checking a request's credentials."""

    OK = "ok"
    MISSING = "missing"  # no (usable) Authorization: challenge
    STALE = "stale"  # right password, expired nonce: challenge with stale=true
    BAD = "bad"  # wrong user, password, realm or a forged nonce: 403


_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _h(algorithm: str, text: str) -> str:
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class DigestCredentials:
    """One parsed ``Authorization: Digest ...`` header (parameter names lower-cased)."""

    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str) -> DigestCredentials | None:
        """Parse a header value; None unless it is a Digest header."""
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() != "digest":
            return None
        params: dict[str, str] = {}
        for item in split_list(rest):
            name, sep, val = item.partition("=")
            if sep:
                params[name.strip().lower()] = val.strip().strip('"')
        return cls(params)


class DigestAuth:
    """Digest authentication of requests against a user -> password table."""

    def __init__(
        self,
        realm: str,
        users: Mapping[str, str],
        *,
        secret: bytes | None = None,
        algorithms: tuple[str, ...] = ("SHA-256", "MD5"),
        nonce_ttl_s: float = 300.0,
    ) -> None:
        """``algorithms`` are offered in order (RFC 7616 8.7: strongest first)."""
        unknown = [a for a in algorithms if a not in _HASHES]
        if unknown or not algorithms:
            raise ValueError(f"unsupported digest algorithms {unknown or algorithms}")
        self.realm = realm
        self.users = dict(users)
        self.algorithms = algorithms
        self.nonce_ttl_s = nonce_ttl_s
        self._secret = secret or secrets.token_bytes(32)

    def nonce(self, now: float) -> str:
        """A fresh nonce bound to ``now``."""
        stamp = f"{int(now * 1000):x}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def _nonce_age(self, nonce: str, now: float) -> float | None:
        stamp, _, mac = nonce.partition(".")
        expected = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        # Bytes: compare_digest refuses str with non-ASCII characters (client-controlled).
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        try:
            return now - int(stamp, 16) / 1000
        except ValueError:
            return None

    def challenge(self, now: float, *, stale: bool = False) -> list[tuple[str, str]]:
        """``WWW-Authenticate`` headers for a 401, one per algorithm, sharing one nonce."""
        nonce = self.nonce(now)
        suffix = ", stale=true" if stale else ""
        return [
            (
                "WWW-Authenticate",
                f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, '
                f'qop="auth"{suffix}',
            )
            for alg in self.algorithms
        ]

    def verify(self, request: SipRequest, now: float) -> AuthResult:
        """Check the request's ``Authorization`` against our users and nonces."""
        creds: DigestCredentials | None = None
        for value in request.headers.get_all("Authorization"):
            parsed = DigestCredentials.parse(value)
            if parsed is not None and parsed.params.get("realm") == self.realm:
                creds = parsed
                break
        if creds is None:
            return AuthResult.MISSING
        p = creds.params
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in self.algorithms:
            return AuthResult.MISSING
        user, nonce, uri, response = (p.get(k) for k in ("username", "nonce", "uri", "response"))
        if not (user and nonce and uri and response):
            return AuthResult.MISSING
        password = self.users.get(user)
        age = self._nonce_age(nonce, now)
        if password is None or age is None or age < -1.0:
            return AuthResult.BAD
        ha1 = _h(algorithm, f"{user}:{self.realm}:{password}")
        ha2 = _h(algorithm, f"{request.method}:{uri}")
        qop = p.get("qop")
        if qop is None:
            expected = _h(algorithm, f"{ha1}:{nonce}:{ha2}")
        elif qop == "auth" and p.get("nc") and p.get("cnonce"):
            expected = _h(algorithm, f"{ha1}:{nonce}:{p['nc']}:{p['cnonce']}:{qop}:{ha2}")
        else:
            return AuthResult.BAD
        if not hmac.compare_digest(expected.encode(), response.lower().encode()):
            return AuthResult.BAD
        if age > self.nonce_ttl_s:
            return AuthResult.STALE
        return AuthResult.OK


def digest_response(
    *,
    username: str,
    password: str,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    algorithm: str = "MD5",
    qop: str | None = "auth",
    nc: str = "00000001",
    cnonce: str = "0a4f113b",
) -> str:
    """An ``Authorization`` header value answering a challenge (client side: tests, tools)."""
    ha1 = _h(algorithm, f"{username}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop is None:
        response = _h(algorithm, f"{ha1}:{nonce}:{ha2}")
        extra = ""
    else:
        response = _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
        extra = f', qop={qop}, nc={nc}, cnonce="{cnonce}"'
    return (
        f'Digest username="{username}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{response}", algorithm={algorithm}{extra}'
    )
