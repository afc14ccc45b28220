"""X-Twilio-Signature: our validator against vectors made by Twilio's own library."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict
from twilio.request_validator import RequestValidator

from gateway.ingress.twilio_signature import (
    SignatureFailure,
    SignedRequest,
    TwilioSignatureValidator,
    compute_signature,
)

TOKEN = "12345678901234567890123456789012"
URL = "wss://gw.example.com/twilio/stream"


def _twilio(url: str, params: dict[str, str] | None = None, token: str = TOKEN) -> str:
    """The signature Twilio's library computes (the reference)."""
    return str(RequestValidator(token).compute_signature(url, params or {}))


def _request(
    signature: str | None,
    *,
    host: str = "gw.example.com",
    scheme: str = "http",
    path: str = "/twilio/stream",
    query: str = "",
    extra: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    websocket: bool = True,
) -> SignedRequest:
    headers: CIMultiDict[str] = CIMultiDict(extra or {})
    if signature is not None:
        headers["x-twilio-signature"] = signature  # header names are case-insensitive
    return SignedRequest(
        scheme=scheme,
        host=host,
        path=path,
        query_string=query,
        headers=headers,
        params=params or {},
        websocket=websocket,
    )


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (URL, {}),
        ("wss://gw.example.com:443/twilio/stream", {}),
        (
            "https://gw.example.com/twilio/voice",
            {"CallSid": "CA123", "From": "+15551230000", "To": "+15559870000", "Digits": "1"},
        ),
        ("https://mycompany.com/myapp.php?foo=1&bar=2", {"CallSid": "CA1", "Caller": "+1415"}),
    ],
)
def test_compute_signature_equals_twilios_library(url: str, params: dict[str, str]) -> None:
    assert compute_signature(TOKEN, url, params) == _twilio(url, params)


def test_twilio_documented_example_vector() -> None:
    # The example from Twilio's webhook-security page, as used in twilio-python's own tests.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    assert compute_signature("12345", url, params) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def test_valid_upgrade_passes_behind_a_tls_proxy() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(
        _twilio(URL),
        host="10.0.0.5:8080",
        extra={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com"},
    )
    assert validator.check(request) is None


def test_valid_upgrade_passes_with_public_url_configured() -> None:
    validator = TwilioSignatureValidator(TOKEN, public_url="https://gw.example.com")
    assert validator.check(_request(_twilio(URL), host="127.0.0.1:8080")) is None


def test_signature_over_the_url_with_port_443_passes() -> None:
    signed = _twilio("wss://gw.example.com:443/twilio/stream")
    validator = TwilioSignatureValidator(TOKEN, public_url="https://gw.example.com")
    assert validator.check(_request(signed, host="127.0.0.1:8080")) is None


def test_signature_without_port_passes_when_the_host_header_has_it() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(
        _twilio(URL), host="gw.example.com:443", extra={"X-Forwarded-Proto": "https"}
    )
    assert validator.check(request) is None


def test_direct_ws_url_with_a_port_passes() -> None:
    url = "ws://127.0.0.1:8080/twilio/stream"
    validator = TwilioSignatureValidator(TOKEN)
    assert validator.check(_request(_twilio(url), host="127.0.0.1:8080")) is None


def test_query_string_signed_in_the_url_or_as_params_both_pass() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    in_url = _twilio("wss://gw.example.com/twilio/stream?tenant=acme")
    as_params = _twilio(URL, {"tenant": "acme"})
    for sig in (in_url, as_params):
        request = _request(sig, query="tenant=acme", extra={"X-Forwarded-Proto": "https"})
        assert validator.check(request) is None


def test_wrong_token_fails() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(_twilio(URL, token="0" * 32), extra={"X-Forwarded-Proto": "https"})
    assert validator.check(request) is SignatureFailure.MISMATCH


def test_changed_path_fails() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(
        _twilio("wss://gw.example.com/other/stream"), extra={"X-Forwarded-Proto": "https"}
    )
    assert validator.check(request) is SignatureFailure.MISMATCH


def test_https_scheme_signature_does_not_pass_for_a_websocket() -> None:
    # Twilio signs the wss:// URL as written in TwiML; an https:// signature is another URL.
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(
        _twilio("https://gw.example.com/twilio/stream"), extra={"X-Forwarded-Proto": "https"}
    )
    assert validator.check(request) is SignatureFailure.MISMATCH


def test_missing_header_fails() -> None:
    validator = TwilioSignatureValidator(TOKEN)
    assert validator.check(_request(None)) is SignatureFailure.MISSING


def test_forwarded_headers_ignored_when_not_trusted() -> None:
    validator = TwilioSignatureValidator(TOKEN, trust_forwarded=False)
    request = _request(
        _twilio(URL),
        host="10.0.0.5:8080",
        extra={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.com"},
    )
    assert validator.check(request) is SignatureFailure.MISMATCH


def test_post_webhook_with_form_params() -> None:
    params = {"CallSid": "CA1", "From": "+15551230000"}
    url = "https://gw.example.com/twilio/voice"
    validator = TwilioSignatureValidator(TOKEN)
    ok = _request(
        _twilio(url, params),
        path="/twilio/voice",
        params=params,
        websocket=False,
        extra={"X-Forwarded-Proto": "https"},
    )
    assert validator.check(ok) is None
    tampered = _request(
        _twilio(url, params),
        path="/twilio/voice",
        params={**params, "From": "+15550000000"},
        websocket=False,
        extra={"X-Forwarded-Proto": "https"},
    )
    assert validator.check(tampered) is SignatureFailure.MISMATCH


def test_sha256_signature_settings_header() -> None:
    sig = compute_signature(TOKEN, URL, algorithm="sha256")
    validator = TwilioSignatureValidator(TOKEN)
    request = _request(
        sig,
        extra={
            "X-Forwarded-Proto": "https",
            "X-Twilio-Webhooks-Signature-Settings": "key=K1,algorithm=HMAC_SHA256",
        },
    )
    assert validator.check(request) is None
    assert validator.check(_request(sig, extra={"X-Forwarded-Proto": "https"})) is not None


def test_validator_requires_a_token() -> None:
    with pytest.raises(ValueError):
        TwilioSignatureValidator("")
