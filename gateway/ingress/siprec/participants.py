"""Participants and streams to channels and roles (roles are data, not code: invariant 6).

One channel per accepted m-line, numbered 0, 1, ... in m-line order. For each channel:

- **participant**: the metadata participant that sends the m-line's stream (``a=label`` ->
  ``<stream>`` -> ``<participantstreamassoc><send>`` or Oracle's ``<participant><send>``); with no
  send associations at all, participants in document order are matched to m-lines in order
  (what Connectel sends). Its display name (else its AOR) is ``ChannelSpec.participant``.
- **side** (caller or callee), from the first rule that separates the channels:
  1. Oracle ``apkt:callingParty`` of the sending participant;
  2. Sonus ``<callData><fromhdr>``: the participant whose AOR matches the original From;
  3. stream labels (``1``, ``a_leg``, ``inbound``, ``10`` mean caller);
  4. m-line order (the first channel is the caller).
- **role**: :class:`RolePolicy` maps caller/callee to roles (customer/agent by default). A call
  with a single channel whose stream carries both parties is ``mixed``.

Participant names and ids land in call metadata under ``siprec.*`` keys (see :func:`map_channels`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.ingress.events import ChannelSpec
from gateway.ingress.siprec.metadata import Participant, RecordingMetadata
from gateway.ingress.siprec.sdp import Negotiated, SessionDescription

__all__ = ["CALLER_LABELS", "ChannelMap", "RolePolicy", "map_channels"]

CALLER_LABELS = frozenset({"1", "a_leg", "inbound", "10"})


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """How caller/callee become roles. ``caller_labels`` are stream labels that mean caller."""

    caller_role: str = "customer"
    callee_role: str = "agent"
    mixed_role: str = "mixed"
    caller_labels: frozenset[str] = CALLER_LABELS


@dataclass(frozen=True, slots=True)
class ChannelMap:
    """The channel layout of a SIPREC call.

    ``channels[i]`` is channel ``i``; ``mlines[i]`` is the offer m-line it records;
    ``participants[i]`` the metadata participant sending it (None if unknown); ``sides[i]`` is
    ``caller``, ``callee`` or ``mixed``; ``role_source`` names the rule that decided the sides.
    """

    channels: tuple[ChannelSpec, ...]
    mlines: tuple[int, ...]
    participants: tuple[Participant | None, ...]
    sides: tuple[str, ...]
    role_source: str
    metadata: dict[str, str] = field(default_factory=dict)

    def channel_of(self, mline: int) -> int | None:
        """The channel recording m-line ``mline``, or None."""
        try:
            return self.mlines.index(mline)
        except ValueError:
            return None


_URI = re.compile(r"<([^>]*)>")


def _aor_key(aor: str | None) -> str | None:
    """Normalize an AOR or a From/To header value to ``user@host`` (lower case)."""
    if not aor:
        return None
    match = _URI.search(aor)
    uri = match.group(1) if match else aor
    uri = uri.strip().split(";", 1)[0].split("?", 1)[0]
    uri = re.sub(r"^(sips?|tel):", "", uri, flags=re.IGNORECASE)
    user, at, host = uri.rpartition("@")
    host = host.split(":", 1)[0]
    return f"{user}@{host}".lower() if at else host.lower()


def _display_name(header: str | None) -> str | None:
    if not header:
        return None
    lt = header.find("<")
    if lt <= 0:
        return None
    name = header[:lt].strip().strip('"').strip()
    return name or None


def _label_of(participant: Participant | None) -> str | None:
    if participant is None:
        return None
    name = (participant.name or "").strip()
    return name or participant.aor


def map_channels(
    offer: SessionDescription,
    negotiated: Sequence[Negotiated | None],
    metadata: RecordingMetadata | None,
    policy: RolePolicy | None = None,
) -> ChannelMap:
    """Map the accepted m-lines of ``offer`` to channels, roles and participants.

    ``negotiated`` is :func:`~gateway.ingress.siprec.sdp.negotiate`'s per-m-line result (None
    entries get no channel). ``metadata`` None (SDP-only offers) leaves participants unknown and
    falls back to labels and m-line order. Never raises for any parsed input.
    """
    policy = policy or RolePolicy()
    mlines = tuple(i for i, n in enumerate(negotiated) if n is not None)
    labels = [offer.media[i].label for i in mlines]
    participants = _senders(metadata, labels)
    sides, source = _sides(metadata, labels, participants, policy)
    channels: list[ChannelSpec] = []
    meta: dict[str, str] = {}
    for ch, (mline, side, participant) in enumerate(zip(mlines, sides, participants, strict=True)):
        n = negotiated[mline]
        assert n is not None
        role = {
            "caller": policy.caller_role,
            "callee": policy.callee_role,
        }.get(side, policy.mixed_role)
        channels.append(ChannelSpec(ch, role, _label_of(participant), n.codec, n.clock_rate))
        prefix = f"siprec.channel.{ch}"
        if labels[ch] is not None:
            meta[f"{prefix}.label"] = str(labels[ch])
        if participant is not None:
            meta[f"{prefix}.participant_id"] = participant.id
            if participant.aor:
                meta[f"{prefix}.aor"] = participant.aor
            if participant.name and participant.name.strip():
                meta[f"{prefix}.name"] = participant.name.strip()
            if side in ("caller", "callee"):
                if participant.aor:
                    meta[f"siprec.{side}.aor"] = participant.aor
                if participant.name and participant.name.strip():
                    meta[f"siprec.{side}.name"] = participant.name.strip()
    if metadata is not None:
        _call_metadata(metadata, meta)
    return ChannelMap(tuple(channels), mlines, tuple(participants), tuple(sides), source, meta)


def _senders(
    metadata: RecordingMetadata | None, labels: Sequence[str | None]
) -> list[Participant | None]:
    if metadata is None:
        return [None] * len(labels)
    out: list[Participant | None] = []
    for label in labels:
        stream = metadata.stream_by_label(label) if label is not None else None
        out.append(metadata.sender_of(stream.id) if stream is not None else None)
    any_send = any(p.send for p in metadata.participants)
    if not any_send and len(metadata.participants) == len(labels) and len(labels) > 1:
        # No associations at all (Connectel): document order is m-line order.
        return list(metadata.participants)
    return out


def _sides(
    metadata: RecordingMetadata | None,
    labels: Sequence[str | None],
    participants: Sequence[Participant | None],
    policy: RolePolicy,
) -> tuple[list[str], str]:
    n = len(labels)
    if n == 0:
        return [], "none"
    if n == 1:
        # One m-line: a single party only when the metadata knows exactly one participant.
        if metadata is not None and len(metadata.participants) == 1 and participants[0]:
            return ["caller"], "single"
        return ["mixed"], "single"

    def separating(flags: list[bool | None]) -> list[str] | None:
        if any(f is None for f in flags):
            return None
        if not any(flags) or all(flags):
            return None
        return ["caller" if f else "callee" for f in flags]

    candidates: list[tuple[str, list[bool | None]]] = []
    candidates.append(
        ("calling_party", [p.calling_party if p is not None else None for p in participants])
    )
    if metadata is not None and metadata.call_data.get("fromhdr"):
        caller_key = _aor_key(metadata.call_data["fromhdr"])
        candidates.append(
            (
                "call_data",
                [
                    (_aor_key(p.aor) == caller_key) if p is not None and p.aor else None
                    for p in participants
                ],
            )
        )
    candidates.append(
        ("label", [(lbl in policy.caller_labels) if lbl is not None else None for lbl in labels])
    )
    for source, flags in candidates:
        sides = separating(flags)
        if sides is not None:
            return sides, source
    return ["caller"] + ["callee"] * (n - 1), "order"


def _call_metadata(metadata: RecordingMetadata, meta: dict[str, str]) -> None:
    if metadata.session_ids:
        meta["siprec.session_id"] = metadata.session_ids[0]
    if metadata.group_ids:
        meta["siprec.group_id"] = metadata.group_ids[0]
    call_data = metadata.call_data
    if call_data.get("callid"):
        meta["siprec.original_call_id"] = call_data["callid"]
    for side, key in (("caller", "fromhdr"), ("callee", "tohdr")):
        header = call_data.get(key)
        if not header:
            continue
        aor = _aor_key(header)
        if aor and f"siprec.{side}.aor" not in meta:
            meta[f"siprec.{side}.aor"] = f"sip:{aor}"
        name = _display_name(header)
        if name and f"siprec.{side}.name" not in meta:
            meta[f"siprec.{side}.name"] = name
    for i, p in enumerate(metadata.participants):
        if p.aor:
            meta[f"siprec.participant.{i}.aor"] = p.aor
        if p.name and p.name.strip():
            meta[f"siprec.participant.{i}.name"] = p.name.strip()
