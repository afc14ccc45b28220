"""The OpenAPI 3.0.3 document of the REST API and live feeds, served at ``/v1/openapi.json``.

:func:`openapi_document` is pure: it builds a fresh ``dict`` on every call (callers may mutate it)
and reads nothing. ``tests/test_api_contract.py`` checks it against the running server
(schemathesis) and against the app's router (every ``/v1`` route and method, both ways).

Notes on what OpenAPI cannot express exactly:

* The live feeds. ``GET /v1/calls/{id}/events`` and ``GET /v1/events`` are Server-Sent Events
  (``text/event-stream``); each ``data:`` line is one ``CallEvent`` (``SseError`` for the
  ``error`` event). ``GET /v1/calls/{id}/live`` is a WebSocket: it is documented as a ``GET`` that
  answers ``101 Switching Protocols``, and the frames (one ``CallEvent`` JSON text frame each) in
  its description.
* Every ``4xx`` body is one line of plain text (``text/plain``), not JSON.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__ as _GATEWAY_VERSION

OPENAPI_VERSION = "3.0.3"

CALL_STATES = ("new", "active", "ending", "ended", "failed", "interrupted")
"""Every state a call summary may show (``interrupted``: the gateway stopped during the call)."""

TRANSCRIPT_FORMATS = ("json", "text", "vtt", "srt")

EVENT_TYPES = (
    "call.started",
    "turn.partial",
    "turn.final",
    "transcript.utterance",
    "call.updated",
    "call.ended",
)

_JSON = "application/json"
_TEXT = "text/plain"
_SSE = "text/event-stream"

_DESCRIPTION = """\
The REST API and live feeds of a Callgate gateway: calls (active and stored), their transcripts \
and their events.

**Authentication.** Every `/v1` route but this document needs a token: `Authorization: Bearer \
TOKEN`, or the `access_token` query parameter for browsers' `EventSource` and `WebSocket`, which \
cannot set headers. Tokens from `api.tokens` may read; tokens from `api.admin_tokens` may also \
`DELETE`. With no token configured at all the API answers loopback clients only, that is a \
loopback peer address and a `Host` of `localhost` or a loopback address (anything else gets \
`403`). A missing or unknown token gets `401` with a `WWW-Authenticate: Bearer` header.

**Errors.** Every `4xx` body is one line of plain text (`text/plain`).

**Live feeds.** `GET /v1/calls/{id}/events` (Server-Sent Events) and `GET /v1/calls/{id}/live` \
(WebSocket) send a call's events: first those after the resume point (`Last-Event-ID` / \
`after`; all of them for a new subscriber), then each new event as it happens. A per-call feed \
ends after `call.ended`. `GET /v1/events` is the firehose of every call's events, with a \
gateway-wide id; it never ends by itself. An idle feed gets an SSE comment (`: keepalive`) or a \
WebSocket ping every `live.keepalive_s` seconds. A subscriber that falls `live.queue_limit` \
events behind gets an `error` event (`slow_consumer`) and is disconnected.

**Not described here:** the media-stream WebSockets of the telephony platforms (paths from \
config: `/twilio/stream`, `/telnyx/stream`, `/signalwire/stream`) and Twilio's voice webhook \
(`POST /twilio/voice`), which are authenticated by the platforms' own signatures.
"""

_LIVE_DESCRIPTION = """\
A WebSocket of the call's events (upgrade with `Connection: Upgrade`, `Upgrade: websocket`; \
browsers pass the token as `access_token`). Each text frame from the server is one `CallEvent` \
as JSON. Resume with `?after=SEQ`: the feed starts with the events whose `seq` is greater. \
Frames sent by the client are ignored; closing the socket ends the feed.

Close codes: `1000` after `call.ended` (reason `call_ended`) or when the client closed, `1001` \
when the gateway shuts down (`shutdown`), `1008` when the subscriber fell too far behind \
(`slow_consumer`). A call that finished long ago sends its stored events, then closes with `1000`.

A request that is not a WebSocket upgrade gets `400` (after the token and the call were checked).
"""

_CALL_EVENTS_DESCRIPTION = """\
Server-Sent Events of one call. Each event has `id:` = the event's `seq`, `event:` = its \
`type`, and `data:` = the `CallEvent` as JSON. The feed ends after `call.ended` (for a call \
that has ended, right after the stored events). Any other end of the feed is announced by an \
`error` event without id whose data is an `SseError` (`slow_consumer`, `shutdown`).

Resume with the `Last-Event-ID` header (what `EventSource` sends when it reconnects) or the \
`after` query parameter: the feed starts with the events whose `seq` is greater.
"""

_FIREHOSE_DESCRIPTION = """\
Server-Sent Events of every call: each event has `id:` = a gateway-wide sequence number (not \
the call's `seq`), `event:` = its type and `data:` = the `CallEvent` as JSON. The stream never \
ends by itself (it ends with an `error` event when the gateway shuts down or the subscriber falls \
behind).

Without `Last-Event-ID` / `after` it sends only the events published from now on. With one, it \
first replays the buffered events after that id (the last `live.firehose_buffer` events); when \
some of the events after that id are no longer buffered, it first sends an `error` event with \
reason `resume_gap`. Ids start again at 1 when the gateway restarts: an id beyond the newest one \
is taken as from before a restart, answered with `resume_gap` and a replay of the whole buffer.
"""


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{name}"}


def _param_ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/parameters/{name}"}


def _obj(
    properties: dict[str, Any], *, required: tuple[str, ...] | None = None, description: str = ""
) -> dict[str, Any]:
    """A closed object schema; every property is required unless ``required`` says otherwise."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _string_map(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": description,
    }


def _ms(description: str) -> dict[str, Any]:
    return {"type": "integer", "description": description}


def _confidence() -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": 1, "description": "Rounded to 4 places."}


def _unix_time(description: str, *, nullable: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number", "description": description}
    if nullable:
        schema["nullable"] = True
    return schema


def _call_summary_properties() -> dict[str, Any]:
    return {
        "id": {"type": "string", "description": "The gateway's call id."},
        "source": {
            "type": "string",
            "description": "Where the call came from: `twilio`, `telnyx`, `signalwire`, ...",
        },
        "source_ids": _string_map(
            "The platform's ids of the call (e.g. `callSid`, `streamSid`); any of them can "
            "name the call in a path."
        ),
        "state": {"type": "string", "enum": list(CALL_STATES)},
        "end_reason": {
            "type": "string",
            "description": "Why the call ended (e.g. `stop`, `max_duration`); empty while active.",
        },
        "started_at": _unix_time("When the call started (unix seconds).", nullable=True),
        "ended_at": _unix_time("When the call ended (unix seconds).", nullable=True),
        "duration_ms": {"type": "integer", "minimum": 0, "description": "Call audio so far."},
        "metadata": _string_map("The platform's custom parameters and call details."),
        "channels": {"type": "array", "items": _ref("CallChannel")},
    }


def _schemas() -> dict[str, Any]:
    word = {
        "text": {"type": "string"},
        "start": _ms("Start on the call clock (ms)."),
        "end": _ms("End on the call clock (ms)."),
        "confidence": _confidence(),
    }
    summary = _call_summary_properties()
    call_updated = {
        **_call_summary_properties(),
        "change": {
            "type": "string",
            "enum": ["metadata", "hold", "resume", "channel_failed", "channel_added"],
            "description": "What changed: roles/participants/metadata, a hold, its end, a "
            "channel whose recognizer failed, or a leg that joined the call (a new channel).",
        },
        "channel_failed": _obj(
            {"channel": {"type": "integer", "minimum": 0}, "reason": {"type": "string"}},
            description="With `change: channel_failed`: the channel and why.",
        ),
    }
    channel = {
        "index": {"type": "integer", "minimum": 0},
        "role": {
            "type": "string",
            "description": "`customer`, `agent`, or any other role from the call.",
        },
        "participant": {"type": "string", "nullable": True},
        "speaker": {
            "type": "string",
            "description": "The label shown: the participant if known, else the role.",
        },
    }
    return {
        "Channel": _obj(
            channel,
            description="One leg of the call.",
        ),
        "CallChannel": _obj(
            {
                **channel,
                "on_hold": {
                    "type": "boolean",
                    "description": "The source says this leg is on hold (SIPREC, AudioHook).",
                },
            },
            description="One leg of a live or finished call.",
        ),
        "CallSummary": _obj(summary, description="A call, without its transcript."),
        "CallList": _obj(
            {
                "calls": {
                    "type": "array",
                    "items": _ref("CallSummary"),
                    "description": "Newest first.",
                },
                "next_cursor": {
                    "type": "string",
                    "nullable": True,
                    "description": "Pass as `cursor` for the next page; null on the last page.",
                },
                "now": _unix_time("The server's clock (unix seconds)."),
            }
        ),
        "Word": _obj(word, description="A word of a turn or an utterance event."),
        "TranscriptWord": _obj(
            {
                **word,
                "speaker": {"type": "string"},
                "channel": {"type": "integer", "minimum": 0},
            },
            description="A word of a transcript utterance.",
        ),
        "Utterance": _obj(
            {
                "speaker": {"type": "string"},
                "role": {"type": "string"},
                "channel": {"type": "integer", "minimum": 0},
                "start": _ms("Start on the call clock (ms)."),
                "end": _ms("End on the call clock (ms)."),
                "text": {"type": "string"},
                "confidence": _confidence(),
                "words": {"type": "array", "items": _ref("TranscriptWord")},
            },
            description="One or more consecutive final turns of one channel.",
        ),
        "TranscriptDocument": _obj(
            {
                "call_id": {"type": "string"},
                "duration_ms": {"type": "integer", "minimum": 0},
                "channels": {"type": "array", "items": _ref("Channel")},
                "metadata": _string_map("The call's metadata."),
                "text": {
                    "type": "string",
                    "description": 'Every utterance as "speaker: text", one per line.',
                },
                "utterances": {
                    "type": "array",
                    "items": _ref("Utterance"),
                    "description": "Sorted by start, end, channel.",
                },
                "source": summary["source"],
                "source_ids": summary["source_ids"],
                "state": summary["state"],
                "end_reason": summary["end_reason"],
                "started_at": summary["started_at"],
                "ended_at": summary["ended_at"],
            },
            description="A call's transcript (`format=json`); what is stored for each call.",
        ),
        "TurnEventData": _obj(
            {
                "key": {
                    "type": "string",
                    "description": '"CHANNEL:EPOCH:TURN_ORDER": partials of a key upsert; its '
                    "final is sent once and never changes.",
                },
                "channel": {"type": "integer", "minimum": 0},
                "epoch": {"type": "integer", "minimum": 0},
                "turn_order": {"type": "integer", "minimum": 0},
                "speaker": {"type": "string"},
                "role": {"type": "string"},
                "start": _ms("Start on the call clock (ms)."),
                "end": _ms("End on the call clock (ms)."),
                "text": {"type": "string"},
                "confidence": _confidence(),
                "words": {"type": "array", "items": _ref("Word")},
                "final": {"type": "boolean"},
            },
            description="`data` of `turn.partial` and `turn.final`.",
        ),
        "UtteranceEventData": _obj(
            {
                "index": {"type": "integer", "minimum": 0},
                "channel": {"type": "integer", "minimum": 0},
                "speaker": {"type": "string"},
                "role": {"type": "string"},
                "start": _ms("Start on the call clock (ms)."),
                "end": _ms("End on the call clock (ms)."),
                "text": {"type": "string"},
                "confidence": _confidence(),
                "words": {"type": "array", "items": _ref("Word")},
                "turns": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Keys of the final turns it joins.",
                },
            },
            description="`data` of `transcript.utterance`: the next utterance of the ordered "
            "transcript (`index` 0, 1, 2, ...).",
        ),
        "CallUpdatedEventData": _obj(
            call_updated,
            required=(*summary, "change"),
            description="`data` of `call.updated`: the call summary, what changed, and "
            "`channel_failed` when a channel's recognizer failed.",
        ),
        "CallEvent": _obj(
            {
                "seq": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "The call's own sequence number: 1, 2, 3, ... without gaps.",
                },
                "call_id": {"type": "string"},
                "type": {"type": "string", "enum": list(EVENT_TYPES)},
                "time": _unix_time("When the event happened (unix seconds)."),
                "data": {
                    "description": "`call.started` and `call.ended`: `CallSummary`; "
                    "`call.updated`: `CallUpdatedEventData`; `turn.partial` and `turn.final`: "
                    "`TurnEventData`; `transcript.utterance`: `UtteranceEventData`.",
                    "anyOf": [
                        _ref("CallSummary"),
                        _ref("CallUpdatedEventData"),
                        _ref("TurnEventData"),
                        _ref("UtteranceEventData"),
                    ],
                },
            },
            description="One event of one call (a live feed's `data:` line or WebSocket frame).",
        ),
        "SseError": _obj(
            {
                "reason": {
                    "type": "string",
                    "description": "`slow_consumer`, `shutdown`, `resume_gap`, ...",
                },
                "oldest": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "`resume_gap` only: the oldest event id the firehose still "
                    "had (the first one replayed); the events between `Last-Event-ID` and it "
                    "are lost.",
                },
            },
            required=("reason",),
            description="`data` of an SSE `error` event (sent without an id) before a feed ends "
            "or, for `resume_gap`, when some events cannot be replayed.",
        ),
        "Error": {"type": "string", "description": "One line of plain text."},
        "Health": _obj(
            {
                "status": {"type": "string", "enum": ["ok"]},
                "draining": {
                    "type": "boolean",
                    "description": "Shutting down: no new calls, active calls finishing.",
                },
                "active_calls": {"type": "integer", "minimum": 0},
            },
            description="The process is alive (also while draining).",
        ),
        "Readiness": _obj(
            {
                "status": {"type": "string", "enum": ["ready", "not_ready"]},
                "problems": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Why not ready (draining, engine not loaded, store not "
                    "writable); empty when ready.",
                },
            }
        ),
    }


def _error(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {_TEXT: {"schema": _ref("Error")}},
    }
    if headers:
        response["headers"] = headers
    return response


def _responses() -> dict[str, Any]:
    return {
        "BadRequest": _error("A query parameter or header is not valid."),
        "Unauthorized": _error(
            "No token, or a token that is not configured.",
            headers={
                "WWW-Authenticate": {
                    "description": '`Bearer`, or `Bearer error="invalid_token"`.',
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        ),
        "Forbidden": _error(
            "For `DELETE`: the token is read-only. With no token configured: the client is not "
            "on loopback (peer address or `Host`)."
        ),
        "NotFound": _error("No call has this id (call id or source id)."),
    }


def _parameters() -> dict[str, Any]:
    return {
        "CallId": {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "The call id, or one of the call's source ids (e.g. Twilio's callSid).",
            "schema": {"type": "string", "minLength": 1},
        },
        "LastEventId": {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "Resume after this event id (what `EventSource` sends when it "
            "reconnects); takes precedence over `after`.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "After": {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Resume after this event id (for clients that cannot set headers). "
            "Empty: not given.",
            "allowEmptyValue": True,
            "schema": {"type": "integer", "minimum": 0},
        },
    }


def _security_schemes() -> dict[str, Any]:
    return {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer TOKEN` (from `api.tokens` or "
            "`api.admin_tokens`).",
        },
        "access_token": {
            "type": "apiKey",
            "in": "query",
            "name": "access_token",
            "description": "The same token as a query parameter, for `EventSource` and "
            "`WebSocket` in browsers.",
        },
    }


def _query(
    name: str, schema: dict[str, Any], description: str, *, empty_is_absent: bool = True
) -> dict[str, Any]:
    """An optional query parameter; ``empty_is_absent``: ``name=`` counts as not given."""
    param: dict[str, Any] = {"name": name, "in": "query", "description": description}
    if empty_is_absent:
        param["description"] = f"{description} Empty: not given."
        param["allowEmptyValue"] = True
    param["schema"] = schema
    return param


def _guarded(*codes: str) -> dict[str, Any]:
    """The error responses every authenticated operation can give, plus ``codes``."""
    out: dict[str, Any] = {
        "401": _response_ref("Unauthorized"),
        "403": _response_ref("Forbidden"),
    }
    for code in codes:
        out[code] = _response_ref({"400": "BadRequest", "404": "NotFound"}[code])
    return out


def _list_calls() -> dict[str, Any]:
    return {
        "operationId": "listCalls",
        "tags": ["calls"],
        "summary": "Active and stored calls, newest first",
        "parameters": [
            _query(
                "state", {"type": "string", "enum": list(CALL_STATES)}, "Only calls in this state."
            ),
            _query(
                "since",
                {"type": "number"},
                "Only calls that started at or after this time (unix seconds).",
            ),
            _query(
                "until",
                {"type": "number"},
                "Only calls that started before this time (unix seconds).",
            ),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "The most calls in one page.",
                empty_is_absent=False,
            ),
            _query(
                "cursor",
                {"type": "string"},
                "`next_cursor` of the previous page (opaque); one that was not issued gets 400.",
            ),
        ],
        "responses": {
            "200": {
                "description": "A page of calls.",
                "content": {_JSON: {"schema": _ref("CallList")}},
            },
            **_guarded("400"),
        },
    }


def _get_call() -> dict[str, Any]:
    return {
        "operationId": "getCall",
        "tags": ["calls"],
        "summary": "One call",
        "responses": {
            "200": {
                "description": "The call.",
                "content": {_JSON: {"schema": _ref("CallSummary")}},
            },
            **_guarded("404"),
        },
    }


def _delete_call() -> dict[str, Any]:
    return {
        "operationId": "deleteCall",
        "tags": ["calls"],
        "summary": "Delete a finished call (admin token)",
        "responses": {
            "204": {"description": "Deleted."},
            **_guarded("404"),
            "409": _error(
                "The call is still active (`new`, `active` or `ending`), or has just ended and "
                "is still being saved (`Retry-After: 1`)."
            ),
        },
    }


def _get_transcript() -> dict[str, Any]:
    text = {"schema": {"type": "string"}}
    return {
        "operationId": "getTranscript",
        "tags": ["calls"],
        "summary": "A call's transcript (so far, for an active call)",
        "parameters": [
            {
                "name": "format",
                "in": "query",
                "description": "`json`: `TranscriptDocument`; `text`: one `[MM:SS.d] speaker: "
                "text` line per utterance; `vtt`: WebVTT captions; `srt`: SubRip captions.",
                "schema": {"type": "string", "enum": list(TRANSCRIPT_FORMATS), "default": "json"},
            }
        ],
        "responses": {
            "200": {
                "description": "The transcript, in the format asked for.",
                "content": {
                    _JSON: {"schema": _ref("TranscriptDocument")},
                    _TEXT: text,
                    "text/vtt": text,
                    "application/x-subrip": text,
                },
            },
            **_guarded("400", "404"),
        },
    }


def _sse_response(description: str) -> dict[str, Any]:
    # OpenAPI before 3.2 (``itemSchema``) cannot describe a stream's items: by the convention of
    # tools that validate event streams (schemathesis), ``schema`` describes each event.
    return {
        "description": description,
        "content": {
            _SSE: {
                "schema": {
                    "type": "object",
                    "description": "One event of the stream (the schema describes each event, "
                    "not the whole body). `data` is one line of JSON: a `CallEvent`, or an "
                    "`SseError` for `event: error`.",
                    "properties": {
                        "event": {"type": "string", "enum": [*EVENT_TYPES, "error"]},
                        "id": {"type": "string", "pattern": "^[0-9]+$"},
                        "data": {"type": "string", "minLength": 2},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    }


def _call_events() -> dict[str, Any]:
    return {
        "operationId": "callEvents",
        "tags": ["live"],
        "summary": "A call's events as Server-Sent Events",
        "description": _CALL_EVENTS_DESCRIPTION,
        "parameters": [_param_ref("LastEventId"), _param_ref("After")],
        "responses": {
            "200": _sse_response("The event stream (ends after `call.ended`)."),
            "204": {
                "description": "The call has ended and there is nothing after the resume point: "
                "a browser's EventSource stops reconnecting."
            },
            **_guarded("400", "404"),
        },
    }


def _call_live() -> dict[str, Any]:
    return {
        "operationId": "callLive",
        "tags": ["live"],
        "summary": "A call's events over a WebSocket",
        "description": _LIVE_DESCRIPTION,
        "parameters": [_param_ref("After")],
        "responses": {
            "101": {"description": "Switching Protocols: the WebSocket of `CallEvent` frames."},
            "400": _error("`after` is not valid, or the request is not a WebSocket upgrade."),
            "401": _response_ref("Unauthorized"),
            "403": _response_ref("Forbidden"),
            "404": _response_ref("NotFound"),
        },
    }


def _firehose() -> dict[str, Any]:
    return {
        "operationId": "allEvents",
        "tags": ["live"],
        "summary": "Every call's events as Server-Sent Events (never ends)",
        "description": _FIREHOSE_DESCRIPTION,
        "parameters": [_param_ref("LastEventId"), _param_ref("After")],
        "responses": {
            "200": _sse_response("The event stream."),
            **_guarded("400"),
        },
    }


def _open_operation(operation: dict[str, Any]) -> dict[str, Any]:
    """An operation that needs no token."""
    return {**operation, "security": []}


def _paths() -> dict[str, Any]:
    call_id = [_param_ref("CallId")]
    return {
        "/v1/calls": {"get": _list_calls()},
        "/v1/calls/{id}": {
            "parameters": call_id,
            "get": _get_call(),
            "delete": _delete_call(),
        },
        "/v1/calls/{id}/transcript": {"parameters": call_id, "get": _get_transcript()},
        "/v1/calls/{id}/events": {"parameters": call_id, "get": _call_events()},
        "/v1/calls/{id}/live": {"parameters": call_id, "get": _call_live()},
        "/v1/events": {"get": _firehose()},
        "/v1/openapi.json": {
            "get": _open_operation(
                {
                    "operationId": "openapi",
                    "tags": ["meta"],
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {_JSON: {"schema": {"type": "object"}}},
                        }
                    },
                }
            )
        },
        "/healthz": {
            "get": _open_operation(
                {
                    "operationId": "health",
                    "tags": ["meta"],
                    "summary": "Liveness, draining and the number of active calls",
                    "responses": {
                        "200": {
                            "description": "The process answers (also while draining).",
                            "content": {_JSON: {"schema": _ref("Health")}},
                        },
                    },
                }
            )
        },
        "/readyz": {
            "get": _open_operation(
                {
                    "operationId": "ready",
                    "tags": ["meta"],
                    "summary": "Readiness for new calls",
                    "responses": {
                        "200": {
                            "description": "Ready: engine loaded, store writable, not draining.",
                            "content": {_JSON: {"schema": _ref("Readiness")}},
                        },
                        "503": {
                            "description": "Not ready; `problems` says why.",
                            "content": {_JSON: {"schema": _ref("Readiness")}},
                        },
                    },
                }
            )
        },
        "/metrics": {
            "get": _open_operation(
                {
                    "operationId": "metrics",
                    "tags": ["meta"],
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "The Prometheus text exposition format.",
                            "content": {_TEXT: {"schema": {"type": "string"}}},
                        }
                    },
                }
            )
        },
        "/": {
            "get": _open_operation(
                {
                    "operationId": "dashboard",
                    "tags": ["meta"],
                    "summary": "The dashboard (a static page that reads this API with a token)",
                    "responses": {
                        "200": {
                            "description": "The page.",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            )
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0.3 document served at ``/v1/openapi.json`` (a fresh dict each call)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Callgate",
            "version": _GATEWAY_VERSION,
            "description": _DESCRIPTION,
            "license": {
                "name": "Apache-2.0",
                "url": "https://www.apache.org/licenses/LICENSE-2.0",
            },
        },
        "tags": [
            {"name": "calls", "description": "Calls and transcripts."},
            {"name": "live", "description": "Live feeds of call events."},
            {
                "name": "meta",
                "description": "Health, readiness, metrics, this document, the dashboard.",
            },
        ],
        "security": [{"bearer": []}, {"access_token": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "parameters": _parameters(),
            "securitySchemes": _security_schemes(),
        },
    }
