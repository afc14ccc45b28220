"""SIPREC bodies: multipart splitting and recording metadata (RFC 7865) in its vendor dialects.

:func:`split_body` takes a request's Content-Type and body and returns the SDP and metadata
parts: ``multipart/mixed`` (split with the stdlib :mod:`email` parser), a bare ``application/sdp``
(Cisco network-based recording: no metadata), or a bare ``application/rs-metadata(+xml)``
(metadata-only UPDATE). Extra parts (Cisco ``application/gtd``) are ignored; a part whose
Content-Disposition is ``recording-session`` counts as metadata whatever its type says.

:func:`parse_metadata` reads the XML namespace-agnostically (local names only), so one code path
covers the RFC 7865 namespace ``urn:ietf:params:xml:ns:recording:1`` (Cisco, Avaya, ProComm,
Connectel), the pre-RFC ``urn:ietf:params:xml:ns:recording`` (Oracle/Acme Packet: ``id=`` and
``session=`` attributes, ``<send>`` inside ``<participant>``, ``apkt:callingParty``; Sonus/Ribbon
with a ``tns:`` prefix and a ``<callData>`` block) and anything older that is well-formed XML.
"""

from __future__ import annotations

import email.parser
import email.policy
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.message import EmailMessage

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as defused_fromstring

__all__ = [
    "BodyError",
    "MetadataError",
    "Participant",
    "RecordingMetadata",
    "SiprecBody",
    "Stream",
    "merge_metadata",
    "parse_metadata",
    "split_body",
]

SDP_TYPE = "application/sdp"
METADATA_TYPES = frozenset({"application/rs-metadata+xml", "application/rs-metadata"})
MULTIPART_TYPE = "multipart/mixed"
# The largest metadata document we parse; RFC 7865 documents are a few kB.
MAX_METADATA_BYTES = 256 * 1024


class BodyError(ValueError):
    """A body we cannot use; ``status`` is the SIP answer (415 unsupported type, 400 broken)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class MetadataError(ValueError):
    """The rs-metadata document is not well-formed XML (or too large)."""


@dataclass(frozen=True, slots=True)
class SiprecBody:
    """The parts of a SIPREC request body that matter (raw bytes, not yet parsed)."""

    sdp: bytes | None
    metadata: bytes | None
    ignored: tuple[str, ...] = ()


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def split_body(content_type: str | None, body: bytes) -> SiprecBody:
    """Split a request body into SDP and rs-metadata.

    Raises :class:`BodyError` with status 415 for a content type that is none of
    ``application/sdp``, ``multipart/mixed`` and ``application/rs-metadata(+xml)``, and 400 for a
    multipart body that cannot be split. An empty body gives an empty :class:`SiprecBody`.
    """
    if not body.strip():
        return SiprecBody(None, None)
    media_type = _media_type(content_type or "")
    if media_type == SDP_TYPE:
        return SiprecBody(body, None)
    if media_type in METADATA_TYPES:
        return SiprecBody(None, body)
    if media_type != MULTIPART_TYPE:
        raise BodyError(f"unsupported Content-Type {content_type!r}", 415)
    if "boundary" not in (content_type or "").lower():
        raise BodyError("multipart body without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + body)
    if not parsed.is_multipart():
        raise BodyError("multipart body has no parts")
    sdp: bytes | None = None
    metadata: bytes | None = None
    ignored: list[str] = []
    for part in parsed.iter_parts():
        assert isinstance(part, EmailMessage)
        part_type = _media_type(str(part.get("Content-Type", "")))
        disposition = _media_type(str(part.get("Content-Disposition", "")))
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = str(part.get_payload()).encode()
        if part_type == SDP_TYPE and sdp is None:
            sdp = payload
        elif (
            part_type in METADATA_TYPES
            or (disposition == "recording-session" and part_type != SDP_TYPE)
        ) and metadata is None:
            metadata = payload
        else:
            ignored.append(part_type or "(untyped)")
    return SiprecBody(sdp, metadata, tuple(ignored))


@dataclass(frozen=True, slots=True)
class Participant:
    """A recorded party: its address of record, display name and the streams it sends/receives.

    ``calling_party`` is Oracle's ``apkt:callingParty`` (None when absent).
    """

    id: str
    aor: str | None = None
    name: str | None = None
    send: tuple[str, ...] = ()
    recv: tuple[str, ...] = ()
    calling_party: bool | None = None


@dataclass(frozen=True, slots=True)
class Stream:
    """A recorded media stream; ``label`` matches the SDP ``a=label`` of its m-line."""

    id: str
    label: str | None = None
    session_id: str | None = None
    mode: str | None = None


@dataclass(frozen=True, slots=True)
class RecordingMetadata:
    """A parsed rs-metadata document.

    ``datamode`` is ``complete`` or ``partial`` (None if absent); ``call_data`` holds Sonus's
    ``<callData>`` children (``fromhdr``, ``tohdr``, ``callid``, ...); ``namespace`` is the root's.
    """

    datamode: str | None = None
    session_ids: tuple[str, ...] = ()
    group_ids: tuple[str, ...] = ()
    participants: tuple[Participant, ...] = ()
    streams: tuple[Stream, ...] = ()
    call_data: dict[str, str] = field(default_factory=dict)
    namespace: str | None = None
    root: str = "recording"

    def participant(self, participant_id: str) -> Participant | None:
        """The participant with this id, or None."""
        return next((p for p in self.participants if p.id == participant_id), None)

    def stream_by_label(self, label: str) -> Stream | None:
        """The stream with this SDP label, or None."""
        return next((s for s in self.streams if s.label == label), None)

    def sender_of(self, stream_id: str) -> Participant | None:
        """The participant that sends ``stream_id`` (first one listed), or None."""
        return next((p for p in self.participants if stream_id in p.send), None)


def _local(tag: object) -> str:
    text = tag if isinstance(tag, str) else ""
    return text.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()


def _namespace(tag: str) -> str | None:
    return tag[1:].split("}", 1)[0] if tag.startswith("{") else None


def _attr(element: ET.Element, *names: str) -> str | None:
    """The first present attribute among ``names`` (matching local names, any namespace)."""
    by_local = {_local(k): v for k, v in element.attrib.items()}
    for name in names:
        value = by_local.get(name.lower())
        if value is not None and value.strip():
            return value.strip()
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == name]


def _text(element: ET.Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    text = element.text.strip()
    return text or None


def _first_text(element: ET.Element, name: str) -> str | None:
    found = _children(element, name)
    return _text(found[0]) if found else None


def parse_metadata(document: bytes | str) -> RecordingMetadata:
    """Parse an rs-metadata XML document (any of the dialects in the module docstring).

    Raises :class:`MetadataError` for malformed XML or a document over 256 KiB. Unknown elements
    are ignored; a document with no participants parses to empty tuples.
    """
    raw = document.encode("utf-8") if isinstance(document, str) else document
    if len(raw) > MAX_METADATA_BYTES:
        raise MetadataError(f"metadata of {len(raw)} bytes (max {MAX_METADATA_BYTES})")
    try:
        root = defused_fromstring(raw.strip(), forbid_dtd=True)
    except DefusedXmlException:
        raise MetadataError("DTDs and entity declarations are not accepted") from None
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise MetadataError(f"malformed rs-metadata XML: {exc}") from None
    datamode = None
    sessions: list[str] = []
    groups: list[str] = []
    call_data: dict[str, str] = {}
    # participant id -> [aor, name, send, recv, calling_party]
    order: list[str] = []
    aors: dict[str, str | None] = {}
    names: dict[str, str | None] = {}
    sends: dict[str, list[str]] = {}
    recvs: dict[str, list[str]] = {}
    calling: dict[str, bool | None] = {}
    streams: list[Stream] = []

    def ensure(pid: str) -> None:
        if pid not in aors:
            order.append(pid)
            aors[pid] = None
            names[pid] = None
            sends[pid] = []
            recvs[pid] = []
            calling[pid] = None

    for element in root:
        kind = _local(element.tag)
        if kind == "datamode":
            datamode = (_text(element) or "").lower() or None
        elif kind == "session":
            sid = _attr(element, "session_id", "id")
            if sid:
                sessions.append(sid)
        elif kind == "group":
            gid = _attr(element, "group_id", "id")
            if gid:
                groups.append(gid)
            for cd in element.iter():
                if _local(cd.tag) == "calldata":
                    for item in cd:
                        value = _text(item)
                        if value is not None:
                            call_data[_local(item.tag)] = value
        elif kind == "participant":
            pid = _attr(element, "participant_id", "id")
            if not pid:
                continue
            ensure(pid)
            for name_id in _children(element, "nameid"):
                aors[pid] = aors[pid] or _attr(name_id, "aor")
                names[pid] = names[pid] or _first_text(name_id, "name")
            sends[pid] += [t for t in map(_text, _children(element, "send")) if t]
            recvs[pid] += [t for t in map(_text, _children(element, "recv")) if t]
            for node in element.iter():
                if _local(node.tag) == "callingparty":
                    flag = (_text(node) or "").lower()
                    calling[pid] = flag in ("true", "1", "yes")
        elif kind == "participantstreamassoc":
            pid = _attr(element, "participant_id", "id")
            if not pid:
                continue
            ensure(pid)
            sends[pid] += [t for t in map(_text, _children(element, "send")) if t]
            recvs[pid] += [t for t in map(_text, _children(element, "recv")) if t]
        elif kind == "stream":
            sid = _attr(element, "stream_id", "id")
            if not sid:
                continue
            streams.append(
                Stream(
                    sid,
                    _first_text(element, "label"),
                    _attr(element, "session_id", "session"),
                    _first_text(element, "mode"),
                )
            )
    participants = tuple(
        Participant(
            pid,
            aors[pid],
            names[pid],
            tuple(dict.fromkeys(sends[pid])),
            tuple(dict.fromkeys(recvs[pid])),
            calling[pid],
        )
        for pid in order
    )
    return RecordingMetadata(
        datamode=datamode,
        session_ids=tuple(sessions),
        group_ids=tuple(groups),
        participants=participants,
        streams=tuple(streams),
        call_data=call_data,
        namespace=_namespace(root.tag),
        root=_local(root.tag),
    )


def merge_metadata(old: RecordingMetadata | None, new: RecordingMetadata) -> RecordingMetadata:
    """Apply an update: ``datamode`` partial merges ``new`` into ``old`` by id, else replaces.

    In a partial update a participant or stream with a known id replaces the old entry (its
    send/recv lists are unioned), new ids are appended.
    """
    if old is None or new.datamode != "partial":
        return new
    parts = {p.id: p for p in old.participants}
    for p in new.participants:
        prev = parts.get(p.id)
        if prev is None:
            parts[p.id] = p
        else:
            parts[p.id] = Participant(
                p.id,
                p.aor or prev.aor,
                p.name or prev.name,
                tuple(dict.fromkeys(prev.send + p.send)),
                tuple(dict.fromkeys(prev.recv + p.recv)),
                p.calling_party if p.calling_party is not None else prev.calling_party,
            )
    streams = {s.id: s for s in old.streams}
    for s in new.streams:
        streams[s.id] = s
    return RecordingMetadata(
        datamode=old.datamode,
        session_ids=tuple(dict.fromkeys(old.session_ids + new.session_ids)),
        group_ids=tuple(dict.fromkeys(old.group_ids + new.group_ids)),
        participants=tuple(parts.values()),
        streams=tuple(streams.values()),
        call_data={**old.call_data, **new.call_data},
        namespace=old.namespace,
        root=old.root,
    )
