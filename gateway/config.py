"""Typed settings: ``config/gateway.toml`` < ``GATEWAY_*`` environment < credentials directory.

Every key with its default is documented in ``config/gateway.toml``. Environment variables use the
``GATEWAY_`` prefix and ``__`` between levels (``GATEWAY_STT__LOCAL__BEAM_SIZE=5``). The credentials
directory (``$CREDENTIALS_DIRECTORY``, which systemd's ``LoadCredential=`` fills) holds one file per
secret, named by the dotted key (``stt.assemblyai.api_key``). Validation happens once, at start:
:func:`load_settings` raises :class:`ConfigError` whose message is one line naming the key.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

ENV_PREFIX = "GATEWAY_"
ENV_DELIMITER = "__"


class ConfigError(Exception):
    """A configuration problem, described in one line that names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalEngineSettings(_Section):
    """The embedded engine: Silero VAD endpointing + faster-whisper."""

    model_path: str = ""
    compute_type: Literal["int8", "int8_float32", "float32", "int16"] = "int8"
    workers: int = Field(0, ge=0, le=64)
    cpu_threads: int = Field(0, ge=0, le=256)
    beam_size: int = Field(5, ge=1, le=10)
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    webrtc_vad_mode: int = Field(2, ge=-1, le=3)
    min_speech_ms: int = Field(120, ge=0, le=5000)
    speech_pad_ms: int = Field(200, ge=0, le=2000)
    min_turn_silence_ms: int = Field(400, ge=50, le=10000)
    max_turn_silence_ms: int = Field(1280, ge=50, le=30000)
    max_turn_ms: int = Field(20000, ge=2000, le=60000)
    partial_interval_ms: int = Field(1000, ge=0, le=60000)
    input_queue_chunks: int = Field(256, ge=1, le=100000)

    @property
    def worker_count(self) -> int:
        """``workers``, or with 0 one per core (at most 4): small models scale better that way."""
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    @model_validator(mode="after")
    def _silences(self) -> LocalEngineSettings:
        if self.max_turn_silence_ms < self.min_turn_silence_ms:
            raise ValueError("max_turn_silence_ms must be >= min_turn_silence_ms")
        if self.model_path and not Path(self.model_path).is_dir():
            raise ValueError(f"model_path {self.model_path!r} is not a directory")
        return self


class AssemblyAISettings(_Section):
    """AssemblyAI Universal Streaming v3, or any v3-compatible server (`gateway stt-server`)."""

    url: str = ""  # empty: the region's official endpoint
    region: Literal["us", "eu"] = "us"
    api_key: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    speech_model: str = "universal-streaming-english"
    format_turns: bool = True
    end_of_turn_confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_turn_silence: int | None = Field(None, ge=0, le=10000)
    max_turn_silence: int | None = Field(None, ge=0, le=30000)
    keyterms_prompt: tuple[str, ...] = ()
    speaker_labels: bool | None = None
    max_speakers: int | None = Field(None, ge=1, le=10)
    inactivity_timeout: int | None = Field(None, ge=5, le=3600)
    chunk_ms: int = Field(100, ge=50, le=1000)
    connect_timeout_s: float = Field(10.0, gt=0, le=120)
    begin_timeout_s: float = Field(10.0, gt=0, le=120)
    terminate_timeout_s: float = Field(5.0, gt=0, le=120)
    ping_interval_s: float = Field(5.0, gt=0, le=300)
    ping_timeout_s: float = Field(10.0, gt=0, le=300)
    max_retries: int = Field(8, ge=0, le=1000)
    backoff_initial_s: float = Field(0.5, gt=0, le=60)
    backoff_max_s: float = Field(30.0, gt=0, le=600)
    rollover_margin_s: float = Field(120.0, ge=0, le=3600)
    max_catchup_ms: int = Field(500, ge=0, le=60000)
    watermark_lag_ms: int = Field(3000, ge=0, le=60000)

    @property
    def endpoint(self) -> str:
        if self.url:
            return self.url
        host = "streaming.eu.assemblyai.com" if self.region == "eu" else "streaming.assemblyai.com"
        return f"wss://{host}/v3/ws"


class SttSettings(_Section):
    engine: Literal["local", "assemblyai"] = "local"
    local: LocalEngineSettings = LocalEngineSettings()
    assemblyai: AssemblyAISettings = AssemblyAISettings()


class SttServerSettings(_Section):
    """`gateway stt-server`: our engines behind the AssemblyAI v3 protocol."""

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    # Keys accepted in Authorization or ?token=; empty = no authentication (loopback use).
    api_keys: tuple[SecretStr, ...] = ()
    engine: Literal["local", "scripted"] = "local"
    script: str = ""  # JSON script for the scripted engine
    max_sessions: int = Field(0, ge=0, le=100000)
    max_session_s: float = Field(10800.0, gt=0, le=86400)
    realtime_allowance_s: float = Field(10.0, ge=0, le=3600)


class TranscriptSettings(_Section):
    join_same_speaker: bool = True
    max_join_gap_ms: int = Field(1000, ge=0, le=60000)


class CallSettings(_Section):
    default_roles: tuple[str, ...] = ("customer", "agent")
    max_channels: int = Field(8, ge=1, le=32)
    max_timestamp_jump_s: int = Field(600, ge=1, le=86400)
    # A live call longer than this is ended (s).
    max_call_s: float = Field(14400.0, gt=0, le=7 * 86400)
    # Live audio may arrive at most max_speed x real time plus burst_s, else the stream closes.
    max_speed: float = Field(1.5, ge=1.0, le=1000.0)
    burst_s: float = Field(10.0, ge=0, le=3600)

    @model_validator(mode="after")
    def _roles(self) -> CallSettings:
        if any(not r.strip() for r in self.default_roles):
            raise ValueError("default_roles must be non-empty strings")
        return self


class ServerSettings(_Section):
    """`gateway serve`: the live gateway (ingress WebSockets, TwiML helper, API, metrics)."""

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    # The base URL telephony platforms are told to use (e.g. https://gw.example.com). It builds
    # the stream URL in TwiML and is one of the URLs a signature is checked against.
    public_url: str = ""
    # Rebuild the URL a platform signed from X-Forwarded-Proto / X-Forwarded-Host (behind a proxy).
    trust_forwarded: bool = True
    max_calls: int = Field(1000, ge=1, le=100000)
    drain_timeout_s: float = Field(30.0, ge=0, le=86400)
    data_dir: str = "data"
    recent_calls: int = Field(1000, ge=0, le=1000000)
    # uvloop (libuv) roughly halves the event loop's own cost per WebSocket message; "asyncio"
    # is the stdlib loop, for debugging or platforms without uvloop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Ping a media WebSocket quiet for this long (s; 0: never) and drop it if its peer does not
    # answer within half of it: a peer that vanished without closing TCP would otherwise keep
    # its call open until calls.max_call_s (ingress/keepalive.py).
    ws_heartbeat_s: float = Field(30.0, ge=0, le=3600)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value and not re.fullmatch(r"(https?|wss?)://[^/?#\s]+/?", value):
            raise ValueError(f"expected a base URL like https://gw.example.com, got {value!r}")
        return value.rstrip("/")


class MediaStreamSettings(_Section):
    """One Media Streams dialect endpoint (Twilio, Telnyx, SignalWire)."""

    enabled: bool = True
    path: str = "/twilio/stream"
    # Key for X-Twilio-Signature (HMAC) on the upgrade; set -> every stream must be signed.
    auth_token: SecretStr = SecretStr("")
    # Without an auth token or shared secret, streams are refused unless this is true.
    allow_unsigned: bool = False
    # A secret the stream must carry as custom parameter `secret_parameter` (or ?token=).
    shared_secret: SecretStr = SecretStr("")
    secret_parameter: str = "token"
    inbound_role: str = "customer"
    outbound_role: str = "agent"
    default_tracks: tuple[Literal["inbound", "outbound"], ...] = ("inbound",)
    reorder_window_ms: int = Field(0, ge=0, le=5000)
    l16_byte_order: Literal["little", "big"] = "little"
    max_message_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # A new stream of the same call (redirect) within this time continues the call (s).
    redirect_grace_s: float = Field(2.0, ge=0, le=600)
    # Each track's consecutive frames go on to the call in blocks of this many ms (0: every
    # frame). Up to stt.assemblyai.chunk_ms it adds no delay (AudioBatcher).
    batch_ms: int = Field(100, ge=0, le=1000)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value):
            raise ValueError(f"must be a URL path starting with '/', got {value!r}")
        return value

    @model_validator(mode="after")
    def _tracks(self) -> MediaStreamSettings:
        if not self.default_tracks:
            raise ValueError("default_tracks must name at least one track")
        return self


class TwilioSettings(MediaStreamSettings):
    # POST path of the TwiML helper for a number's voice webhook; "" turns it off.
    voice_path: str = "/twilio/voice"
    # After starting the stream, TwiML dials this number or SIP URI ("" = none) ...
    voice_dial: str = ""
    # ... or runs these TwiML verbs; with neither, the call waits (<Pause>) until hung up.
    voice_then: str = ""


class ApiSettings(_Section):
    """REST API and live feeds: bearer tokens (read-only and admin) and CORS."""

    # Read-only tokens: GET routes and live feeds. Admin tokens may also DELETE.
    tokens: tuple[SecretStr, ...] = ()
    admin_tokens: tuple[SecretStr, ...] = ()
    # With no token at all, the API answers loopback clients only.
    cors_origins: tuple[str, ...] = ()
    # /metrics and /healthz without a token.
    open_metrics: bool = True


class StoreSettings(_Section):
    # SQLite file; "" = DATA_DIR/callgate.sqlite3.
    path: str = ""
    # Finished calls older than this are deleted (days); 0 keeps them forever.
    retention_days: float = Field(30.0, ge=0, le=36500)


class LiveSettings(_Section):
    # Events queued for one slow subscriber before it is disconnected.
    queue_limit: int = Field(1000, ge=10, le=1000000)
    # A comment line (SSE) / ping (WebSocket) this often on an idle feed (s).
    keepalive_s: float = Field(15.0, gt=0, le=3600)
    # Recent events of all calls kept for the firehose's resume.
    firehose_buffer: int = Field(10000, ge=100, le=10000000)
    # Events of one call kept in memory; a resume from further back is served from the store
    # (which holds every event but partials), so a long call's memory stays flat.
    events_in_memory: int = Field(200, ge=10, le=10000000)


class WebhookSettings(_Section):
    urls: tuple[str, ...] = ()
    # HMAC-SHA256 key for X-Callgate-Signature; required when urls are set.
    secret: SecretStr = SecretStr("")
    # What is delivered: call.ended (the whole transcript) and optionally each turn.final.
    events: tuple[Literal["call.ended", "turn.final"], ...] = ("call.ended",)
    timeout_s: float = Field(10.0, gt=0, le=300)
    backoff_initial_s: float = Field(2.0, gt=0, le=3600)
    backoff_max_s: float = Field(600.0, gt=0, le=86400)
    # Undelivered this long after the event: dead-lettered (s).
    give_up_after_s: float = Field(86400.0, gt=0, le=30 * 86400)
    concurrency: int = Field(4, ge=1, le=256)

    @model_validator(mode="after")
    def _secret(self) -> WebhookSettings:
        for url in self.urls:
            if not re.fullmatch(r"https?://\S+", url):
                raise ValueError(f"urls: {url!r} is not an http(s) URL")
        if self.urls and not self.secret.get_secret_value():
            raise ValueError("secret: required when webhook urls are set")
        return self


class RecordingSettings(_Section):
    enabled: bool = False
    # "" = DATA_DIR/recordings.
    dir: str = ""


class TelnyxSettings(MediaStreamSettings):
    path: str = "/telnyx/stream"
    # Telnyx's `start` names no tracks; its frame order is not guaranteed.
    default_tracks: tuple[Literal["inbound", "outbound"], ...] = ("inbound", "outbound")
    reorder_window_ms: int = Field(200, ge=0, le=5000)


class SignalWireSettings(MediaStreamSettings):
    path: str = "/signalwire/stream"


def _url_path(value: str) -> str:
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value):
        raise ValueError(f"must be a URL path starting with '/', got {value!r}")
    return value


class AudioHookSettings(_Section):
    """Genesys AudioHook Monitor endpoint (a WebSocket Genesys Cloud connects to)."""

    enabled: bool = True
    path: str = "/audiohook/ws"
    # "API_KEY" or "API_KEY:CLIENT_SECRET_BASE64" entries; a key with a secret must sign.
    api_keys: tuple[SecretStr, ...] = ()
    # With no api_keys, sessions are refused (disconnect unauthorized) unless this is true.
    allow_unauthenticated: bool = False
    max_signature_age_s: float = Field(10.0, gt=0, le=3600)
    clock_skew_s: float = Field(3.0, ge=0, le=600)
    min_nonce_length: int = Field(22, ge=0, le=1024)
    # Refusals are answered no sooner than this after the upgrade request (timing leaks).
    auth_failure_delay_s: float = Field(0.5, ge=0, le=30)
    external_role: str = "customer"
    internal_role: str = "agent"
    # Media formats accepted, in order of preference.
    formats: tuple[Literal["PCMU", "L16"], ...] = ("PCMU", "L16")
    max_message_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # The client must send `open` within this time after the upgrade (s).
    open_timeout_s: float = Field(10.0, gt=0, le=600)
    # After our `disconnect`, wait this long for the client's `close` (s).
    close_timeout_s: float = Field(5.0, gt=0, le=600)
    # A session that continues this one (continuedSessions) may arrive within this time (s).
    reconnect_grace_s: float = Field(10.0, ge=0, le=600)
    # Send our transcripts back to Genesys as `event` messages with `transcript` entities.
    send_transcripts: bool = False
    # ... partials too (else finals only).
    send_partials: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _url_path(value)

    @model_validator(mode="after")
    def _keys(self) -> AudioHookSettings:
        from gateway.ingress.audiohook_signature import parse_key_entries

        try:
            parse_key_entries(k.get_secret_value() for k in self.api_keys)
        except ValueError as exc:
            raise ValueError(f"api_keys: {exc}") from None
        if not self.formats:
            raise ValueError("formats must name at least one format")
        return self


class StereoWsSettings(_Section):
    """Stereo PCM WebSocket: FreeSWITCH mod_audio_fork / mod_audio_stream, jambonz listen."""

    enabled: bool = True
    path: str = "/stereo/ws"
    # Subprotocols accepted (the client's offer is echoed); with accept_any_subprotocol any
    # offered one is echoed.
    subprotocols: tuple[str, ...] = (
        "audio.drachtio.org",
        "audio.jambonz.org",
        "audiostream.drachtio.org",
    )
    accept_any_subprotocol: bool = True
    # Basic auth (jambonz wsAuth); the password is a secret.
    username: str = ""
    password: SecretStr = SecretStr("")
    # A shared secret in the header `secret_header` (mod_audio_stream STREAM_EXTRA_HEADERS), or
    # as ?token= on the URL (mod_audio_fork, which sends no headers).
    shared_secret: SecretStr = SecretStr("")
    secret_header: str = "X-Callgate-Secret"
    # With neither basic auth nor a shared secret, streams are refused unless this is true.
    allow_unsigned: bool = False
    # Used when the metadata (first text frame) and the query (?sampleRate=&mixType=) say nothing.
    sample_rate: int = Field(8000, ge=8000, le=48000)
    mix_type: Literal["stereo", "mono", "mixed"] = "stereo"
    # Roles: stereo left (channel 0, FreeSWITCH's read stream: the caller) and right; mono.
    left_role: str = "customer"
    right_role: str = "agent"
    mono_role: str = "customer"
    max_message_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024)
    # A new stream with the same callSid (jambonz) within this time continues the call (s).
    reconnect_grace_s: float = Field(0.0, ge=0, le=600)
    # Audio is handed on in blocks of this many ms (0: every frame): the clock and STT then
    # work per block, not per 20 ms frame. Up to stt.assemblyai.chunk_ms it adds no delay.
    batch_ms: int = Field(100, ge=0, le=1000)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _url_path(value)


class SiprecSettings(_Section):
    """SIPREC Session Recording Server: SIP over UDP/TCP (TLS with a certificate) plus RTP."""

    enabled: bool = False
    host: str = "0.0.0.0"
    # SIP transports to listen on (TLS is added when tls_cert and tls_key are set).
    transports: tuple[Literal["udp", "tcp"], ...] = ("udp", "tcp")
    # SIP listening ports (0: any free port).
    udp_port: int = Field(5060, ge=0, le=65535)
    tcp_port: int = Field(5060, ge=0, le=65535)
    # SIP over TLS, on when both tls_cert and tls_key (PEM file paths) are set.
    tls_port: int = Field(5061, ge=0, le=65535)
    tls_cert: str = ""
    tls_key: str = ""
    # CA certificates (PEM file) a peer's certificate must chain to when we open a TLS
    # connection ourselves (a BYE whose dialog connection is gone); "" = the system's.
    tls_ca: str = ""
    # Address written into our Contact and the SDP answer (where SBCs send RTP); "" = host, or
    # this machine's primary address when host is a wildcard.
    media_address: str = ""
    # RTP ports (even, RTCP on port + 1) are taken from this range, two per recorded stream.
    rtp_port_min: int = Field(40000, ge=1024, le=65534)
    rtp_port_max: int = Field(40999, ge=1025, le=65535)
    # SRTP (SDES): "off" plain RTP only, "allow" both, "require" SRTP only.
    srtp: Literal["off", "allow", "require"] = "allow"
    # Source addresses (CIDRs) allowed to send SIP; others get 403.
    allowlist: tuple[str, ...] = ()
    # Digest authentication of INVITEs: "user:password" entries (secrets: environment or
    # credentials). With neither allowlist nor users, every INVITE is refused unless
    # allow_any_source is true.
    digest_users: tuple[SecretStr, ...] = ()
    digest_realm: str = "callgate"
    allow_any_source: bool = False
    # Roles of the recorded parties: the caller (the SRC's first/calling participant) and callee.
    caller_role: str = "customer"
    callee_role: str = "agent"
    # Stream labels (a=label) that mean the caller's stream.
    caller_labels: tuple[str, ...] = ("1", "a_leg", "inbound", "10")
    # Largest SIP message body accepted (bytes); larger ones are answered 413.
    max_message_bytes: int = Field(65536, ge=4096, le=16 * 1024 * 1024)
    # SIP over TCP/TLS: connections open at once (one more is closed at once), and how long one
    # may send nothing, not even a keep-alive, before it is closed (s; 0 = never).
    max_connections: int = Field(1024, ge=1, le=65536)
    tcp_idle_timeout_s: float = Field(900.0, ge=0, le=86400)
    # RTP jitter buffer: reorder window and the longest a packet waits for a missing one (ms).
    jitter_window_ms: int = Field(60, ge=0, le=1000)
    jitter_max_delay_ms: int = Field(200, ge=20, le=5000)
    # Audio a call may have waiting for its STT sessions (s of 20 ms packets per stream): UDP has
    # no backpressure, so beyond this newly arriving packets are dropped (and the hole is
    # silence on the call clock) instead of the queue growing while recognition lags.
    max_backlog_s: float = Field(10.0, ge=1.0, le=300.0)
    # Each stream's consecutive packets go on to the call in blocks of this many ms (0: every
    # packet), after the jitter buffer. Up to stt.assemblyai.chunk_ms it adds no delay.
    batch_ms: int = Field(100, ge=0, le=1000)

    @field_validator("allowlist")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR or address") from None
        return value

    @model_validator(mode="after")
    def _ranges(self) -> SiprecSettings:
        if self.rtp_port_max - self.rtp_port_min < 3:
            raise ValueError("rtp_port_max must be at least rtp_port_min + 3")
        for entry in self.digest_users:
            user, sep, password = entry.get_secret_value().partition(":")
            if not sep or not user or not password:
                raise ValueError("digest_users entries must be 'user:password'")
        if not self.transports and not self.tls_cert:
            raise ValueError("transports: name at least one (or configure TLS)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.enabled and not (self.allowlist or self.digest_users or self.allow_any_source):
            raise ValueError(
                "allowlist: with SIPREC enabled set allowlist CIDRs or digest_users, or "
                "allow_any_source = true"
            )
        return self


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"
    log_transcripts: bool = False


class Settings(BaseSettings):
    """The whole configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    stt: SttSettings = SttSettings()
    stt_server: SttServerSettings = SttServerSettings()
    transcript: TranscriptSettings = TranscriptSettings()
    calls: CallSettings = CallSettings()
    server: ServerSettings = ServerSettings()
    api: ApiSettings = ApiSettings()
    store: StoreSettings = StoreSettings()
    live: LiveSettings = LiveSettings()
    webhooks: WebhookSettings = WebhookSettings()
    recording: RecordingSettings = RecordingSettings()
    twilio: TwilioSettings = TwilioSettings()
    telnyx: TelnyxSettings = TelnyxSettings()
    signalwire: SignalWireSettings = SignalWireSettings()
    audiohook: AudioHookSettings = AudioHookSettings()
    stereo_ws: StereoWsSettings = StereoWsSettings()
    siprec: SiprecSettings = SiprecSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: credentials > environment > the TOML file (passed as init kwargs).
        return (
            _CredentialsSource(settings_cls),
            _StrictEnvSource(settings_cls),
            init_settings,
        )


class _StrictEnvSource(EnvSettingsSource):
    """The standard env source, plus an error for ``GATEWAY_*`` names that match no key."""

    def __call__(self) -> dict[str, Any]:
        for name in os.environ:
            if name.upper().startswith(ENV_PREFIX) and name.upper() != "GATEWAY_CONFIG":
                path = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
                if not _known_path(Settings, path):
                    raise ConfigError(f"{name}: unknown setting {'.'.join(path)!r}")
                if _is_sequence(_field_at(Settings, path)):
                    try:
                        ok = isinstance(json.loads(os.environ[name]), list)
                    except json.JSONDecodeError:
                        ok = False
                    if not ok:
                        raise ConfigError(
                            f'{name} ({".".join(path)}): expected a JSON list, e.g. \'["a", "b"]\''
                        )
        return super().__call__()


class _CredentialsSource(PydanticBaseSettingsSource):
    """Files in ``$CREDENTIALS_DIRECTORY`` named by dotted key, e.g. ``stt.assemblyai.api_key``."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return {}
        out: dict[str, Any] = {}
        base = Path(directory)
        if not base.is_dir():
            raise ConfigError(f"CREDENTIALS_DIRECTORY {directory!r} is not a directory")
        for entry in sorted(base.iterdir()):
            path = entry.name.split(".")
            if not entry.is_file() or not _known_path(Settings, path):
                continue  # systemd may pass credentials meant for other programs
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            text = entry.read_text().strip()
            if _is_sequence(_field_at(Settings, path)):
                # A list credential: JSON (as in the environment), or one bare value.
                try:
                    value = json.loads(text) if text.startswith("[") else [text]
                except json.JSONDecodeError:
                    raise ConfigError(f"credential {entry.name}: not a JSON list") from None
                node[path[-1]] = value
            else:
                node[path[-1]] = text
        return out


def _field_at(model: type[BaseModel], path: list[str]) -> FieldInfo | None:
    field = model.model_fields.get(path[0])
    if field is None or len(path) == 1:
        return field
    sub = field.annotation
    if isinstance(sub, type) and issubclass(sub, BaseModel):
        return _field_at(sub, path[1:])
    return None


def _is_sequence(field: FieldInfo | None) -> bool:
    return field is not None and typing.get_origin(field.annotation) in (tuple, list)


def _is_secret(field: FieldInfo | None) -> bool:
    if field is None:
        return False
    annotation = field.annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _known_path(model: type[BaseModel], path: list[str]) -> bool:
    return _field_at(model, path) is not None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, merge and validate the configuration.

    ``path`` (or ``$GATEWAY_CONFIG``) names the TOML file; without one, defaults apply.
    Raises :class:`ConfigError` with a one-line message on any problem.
    """
    chosen = path if path is not None else os.environ.get("GATEWAY_CONFIG") or None
    file_values: dict[str, Any] = {}
    if chosen is not None:
        p = Path(chosen)
        try:
            with p.open("rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {str(p)!r} is a directory") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r}: invalid TOML: {exc}") from None
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode an environment value (a list that is not JSON).
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f'{exc}{cause}; lists are JSON, e.g. \'["a", "b"]\'') from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"] if not isinstance(p, int)]
    msg = first["msg"]
    if first["type"] == "value_error":
        # Cross-field checks report on their section; their message starts with the key.
        msg = msg.removeprefix("Value error, ")
        section = _field_at(Settings, loc) if loc else None
        sub = section.annotation if section is not None else None
        head = msg.split(" ", 1)[0]
        if isinstance(sub, type) and issubclass(sub, BaseModel) and head in sub.model_fields:
            loc.append(head)
    key = ".".join(loc) or "(root)"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif (
        "input" in first
        and not isinstance(first["input"], dict | list)
        and not _is_secret(_field_at(Settings, loc) if loc else None)
    ):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return f"{key}: {msg}{more if len(errors) > 1 else ''}"
