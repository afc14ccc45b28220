"""SIPREC through `gateway serve` over real loopback sockets (SIP over UDP/TCP, RTP over UDP).

A small Python SIP client plays the Session Recording Client; the scripted engine hears
"hello there" and "goodbye" on every channel, so each call's transcript is known. Covered: the
200 retransmitted over UDP until the ACK, CANCEL before the answer, OPTIONS (and INVITE) while
draining, a re-INVITE to hold and back, an INVITE from outside the allowlist, malformed SIP
(answered or dropped, counted) while a concurrent call completes its transcript.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway.app import drain
from gateway.calls.call import Call, CallError, CallOutput, CallUpdated
from gateway.ingress.events import Audio
from gateway.ingress.file import probe_wav
from gateway.ingress.siprec.dialog import IncomingCall
from gateway.ingress.siprec.message import (
    SipParser,
    SipRequest,
    SipResponse,
    build_response,
    parse_name_addr,
)
from gateway.ingress.siprec.sdp import parse_sdp
from gateway.media.codec import Codec, decode, encode, float32_to_pcm16
from tests.gateway_server import Gateway, hello_engine, metric, poll_until
from tests.siprec_peer import (
    AORS,
    NAMES,
    SipTcpClient,
    SipUdpClient,
    answer_ports,
    establish,
    establish_stream,
    multipart,
    play_rtp,
    rs_metadata,
    sdp_offer,
    siprec_gateway,
    siprec_settings,
)

SILENCE = b"\x00\x00" * 16000  # 2 s of 8 kHz PCM16 per channel
# 2 s of a 440 Hz tone, 8 kHz PCM16 (never µ-law silence once encoded)
TONE = float32_to_pcm16(0.3 * np.sin(2 * np.pi * 440 * (np.arange(16000) + 0.5) / 8000))


async def _call_json(gw: Gateway, call_id: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.http}/v1/calls/{call_id}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        data: dict[str, object] = await resp.json()
        return data


def _words(doc: dict[str, object]) -> dict[int, str]:
    out: dict[int, list[str]] = {}
    for u in doc["utterances"]:  # type: ignore[attr-defined]
        out.setdefault(u["channel"], []).append(u["text"])
    return {ch: " ".join(t) for ch, t in sorted(out.items())}


async def test_udp_call_200_retransmitted_until_ack_then_transcribed(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog = client.dialog(target)
        client.send(dialog.invite(), target)
        await client.expect(100)
        ok = await client.expect(200)
        # No ACK yet: the same 200 comes again after T1 (0.5 s), then 2*T1.
        again = await client.expect(200, within_s=1.5)
        third = await client.expect(200, within_s=2.5)
        assert again.to_bytes() == ok.to_bytes() == third.to_bytes()
        body = ok.body.decode()
        assert ok.headers.get("Content-Type") == "application/sdp"
        assert body.count("m=audio") == 2
        assert body.index("a=label:1") < body.index("a=label:2")
        assert body.count("a=recvonly") == 2 and "sendrecv" not in body
        dialog.to_tag = parse_name_addr(ok.headers.get("To") or "").tag
        client.send(dialog.ack(), target)
        assert await client.quiet(1.2) == []  # acknowledged: no more retransmissions

        ports = answer_ports(ok)
        assert tuple(ports) == svc.media_ports(dialog.call_id)
        await play_rtp([("127.0.0.1", p) for p in ports], [SILENCE, SILENCE], speed=4.0)
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        call = gw.registry.get(dialog.call_id)
        assert call is not None
        stored = gw.stored(call.call_id)
        assert stored["state"] == "ended"
        assert stored["source"] == "siprec"
        assert _words(stored) == {0: "hello there goodbye", 1: "hello there goodbye"}
        channels = stored["channels"]
        assert [(c["role"], c["participant"]) for c in channels] == [
            ("customer", NAMES[0]),
            ("agent", NAMES[1]),
        ]
        assert stored["metadata"]["siprec.caller.aor"] == AORS[0]
        assert stored["metadata"]["siprec.callee.name"] == NAMES[1]
        text = await gw.metrics()
        assert metric(text, "callgate_streams_total", source="siprec") == 1
        assert metric(text, "callgate_media_frames_total", source="siprec") >= 200
        assert svc.ports.in_use == 0
        client.close()


async def test_cancel_before_answer(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        gate = asyncio.Event()

        async def slow_admission(incoming: IncomingCall) -> tuple[int, str] | None:
            await gate.wait()
            return None

        svc.admission = slow_admission
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog = client.dialog(target)
        client.send(dialog.invite(), target)
        await client.expect(100)
        client.send(dialog.cancel(), target)
        got = {(await client.expect(200, 487)).status for _ in range(2)}
        assert got == {200, 487}
        client.send(dialog.ack(), target)  # for the 487
        gate.set()
        assert await client.quiet(1.0) == []  # no 200 for the cancelled INVITE
        assert gw.registry.active_count == 0
        assert svc.server.calls == ()
        assert svc.ports.in_use == 0
        assert metric(await gw.metrics(), "callgate_streams_total", source="siprec") == 0
        client.close()


async def test_options_and_invite_while_draining_get_503(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog = client.dialog(target)
        client.send(dialog.request("OPTIONS", in_dialog=False), target)
        ok = await client.expect(200)
        assert "INVITE" in (ok.headers.get("Allow") or "")
        await drain(gw.app)  # no call active: returns at once, the registry stops accepting
        client.send(dialog.request("OPTIONS", in_dialog=False, cseq=2), target)
        await client.expect(503)
        invite = client.dialog(target)
        client.send(invite.invite(), target)
        await client.expect(503)
        client.send(invite.ack(), target)
        text = await gw.metrics()
        assert metric(text, "callgate_streams_rejected_total", source="siprec", reason="draining")
        client.close()


async def test_reinvite_to_hold_and_back(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        updates: list[tuple[str, int | None]] = []

        def listener(call: Call, output: CallOutput) -> None:
            if isinstance(output, CallUpdated):
                updates.append((output.change, output.channel))

        gw.registry.add_listener(listener)
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        ports = [("127.0.0.1", p) for p in answer_ports(ok)]
        await play_rtp(ports, [SILENCE[:8000], SILENCE[:8000]], speed=4.0)
        call = gw.registry.get(dialog.call_id)
        assert call is not None

        client.send(dialog.reinvite(direction="inactive"), target)
        held = await client.expect(200)
        client.send(dialog.ack(), target)
        assert held.body.count(b"a=inactive") == 2
        await poll_until(lambda: ("hold", None) in updates, 5)
        detail = await _call_json(gw, call.call_id)
        assert [c["on_hold"] for c in detail["channels"]] == [True, True]  # type: ignore[attr-defined]

        client.send(dialog.reinvite(direction="sendonly"), target)
        resumed = await client.expect(200)
        client.send(dialog.ack(), target)
        assert resumed.body.count(b"a=recvonly") == 2
        assert answer_ports(resumed) == answer_ports(ok)
        await poll_until(lambda: ("resume", None) in updates, 5)
        detail = await _call_json(gw, call.call_id)
        assert [c["on_hold"] for c in detail["channels"]] == [False, False]  # type: ignore[attr-defined]
        await play_rtp(ports, [SILENCE[:8000], SILENCE[:8000]], speed=4.0)

        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        assert updates == [("hold", None), ("resume", None)]
        assert gw.stored(call.call_id)["state"] == "ended"
        client.close()


async def test_a_stream_gone_quiet_does_not_keep_its_last_packets(tmp_path: Path) -> None:
    """Packets go on to the call in 100 ms blocks (siprec.batch_ms). A stream that stops
    sending (silence suppression, a pause) must not keep the tail of its speech waiting for a
    next packet that may not come for seconds: it reaches the call once the stream is quiet."""
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        ports = [("127.0.0.1", p) for p in answer_ports(ok)]
        speech = encode(Codec.L16, decode(Codec.PCMU, bytes(range(256)) * 21))[: 2 * 8 * 660]
        sent = await play_rtp(ports, [speech, speech], speed=2.0)  # 33 packets: 60 ms over
        call = gw.registry.get(dialog.call_id)
        assert call is not None and sent == 33
        await poll_until(
            lambda: all(c.received_samples == sent * 160 for c in call.channels.values()), 2
        )
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        client.close()


async def test_reinvite_with_another_codec_keeps_the_audio(tmp_path: Path) -> None:
    """An SRC switching from PCMU to PCMA mid-call (re-INVITE): the same ports answer with
    PCMA and the audio that follows reaches the call, not dropped as an unknown type."""
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        ports = [("127.0.0.1", p) for p in answer_ports(ok)]
        speech = encode(Codec.L16, decode(Codec.PCMU, bytes(range(256)) * 32))  # ~1 s, loud
        await play_rtp(ports, [speech, speech], speed=4.0)
        call = gw.registry.get(dialog.call_id)
        assert call is not None
        before = [c.received_samples for c in call.channels.values()]

        client.send(dialog.reinvite(codec=Codec.PCMA), target)
        changed = await client.expect(200)
        client.send(dialog.ack(), target)
        assert changed.body.count(b"a=rtpmap:8 PCMA/8000") == 2
        assert answer_ports(changed) == answer_ports(ok)
        sent = await play_rtp(ports, [speech, speech], speed=4.0, codec=Codec.PCMA)
        await poll_until(
            lambda: all(
                c.received_samples >= b + sent * 160
                for c, b in zip(call.channels.values(), before, strict=True)
            ),
            5,
        )
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        assert gw.stored(call.call_id)["state"] == "ended"
        client.close()


async def test_reinvite_adding_a_stream_adds_a_leg_to_the_call(tmp_path: Path) -> None:
    """A third participant joins (a conference): the re-INVITE appends an m-line and names its
    sender. It gets its own port, its audio is transcribed from the call time it joined at,
    under the new participant's name, and the call's two legs go on untouched. The call's
    recording grows a third channel, silent until the leg joined."""
    settings = siprec_settings(tmp_path, sections={"recording": {"enabled": True}})
    async with siprec_gateway(settings, hello_engine()) as (gw, svc):
        updates: list[tuple[str, int | None]] = []
        gw.registry.add_listener(
            lambda call, o: (
                updates.append((o.change, o.channel)) if isinstance(o, CallUpdated) else None
            )
        )
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        two = [("127.0.0.1", p) for p in answer_ports(ok)]
        await play_rtp(two, [SILENCE[:16000], SILENCE[:16000]])  # 1 s at real time
        call = gw.registry.get(dialog.call_id)
        assert call is not None

        names = (*NAMES, "Carol Supervisor")
        aors = (*AORS, "sip:supervisor-2@pbx.example")
        client.send(
            dialog.reinvite((30000, 30002, 30004), metadata=rs_metadata(names, aors)), target
        )
        joined = await client.expect(200)
        client.send(dialog.ack(), target)
        ports = answer_ports(joined)
        assert ports[:2] == answer_ports(ok) and ports[2] not in ports[:2]
        assert joined.body.count(b"a=recvonly") == 3
        await poll_until(lambda: ("channel_added", 2) in updates, 5)
        added_at = call.channels[2].start * 1000 // 8000
        assert 700 <= added_at <= 1500  # where the other legs were when it joined (~1 s)
        three = [("127.0.0.1", p) for p in ports]
        await play_rtp(three, [SILENCE, SILENCE, TONE])  # 2 s on every leg
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()

        stored = gw.stored(call.call_id)
        assert _words(stored) == {
            0: "hello there goodbye",
            1: "hello there goodbye",
            2: "hello there goodbye",
        }
        assert [(c["index"], c["participant"]) for c in stored["channels"]] == [
            (0, NAMES[0]),
            (1, NAMES[1]),
            (2, "Carol Supervisor"),
        ]
        (hello,) = [u for u in stored["utterances"] if u["channel"] == 2 and "hello" in u["text"]]
        assert hello["speaker"] == "Carol Supervisor"
        assert abs(hello["start"] - (added_at + 100)) <= 300  # its own audio's 0.1 s, on the call
        assert stored["metadata"]["siprec.channel.2.aor"] == aors[2]
        # Its first packets are placed by arrival, the others' by RTP time: a loaded loop may
        # put a few of them before where it joined (dropped as late), never more.
        assert call.channels[2].clock.late_frames <= 10
        assert svc.ports.in_use == 0
        client.close()

    recording = Path(stored["metadata"]["recording"])
    fmt = await asyncio.to_thread(probe_wav, recording)
    assert (fmt.codec, fmt.channels, fmt.sample_rate) == (Codec.PCMU, 3, 8000)
    raw = await asyncio.to_thread(recording.read_bytes)
    at = raw.index(b"data")
    data = raw[at + 8 : at + 8 + int.from_bytes(raw[at + 4 : at + 8], "little")]
    legs = [data[c::3] for c in range(3)]
    assert len(legs[0]) == len(legs[1]) == len(legs[2])
    assert len(legs[0]) // 8 == stored["duration_ms"]
    assert set(legs[0]) == set(legs[1]) == {0xFF}  # the first two legs sent silence throughout
    # The third: µ-law silence until it joined, then its tone (a few late frames aside).
    sound = [i for i, b in enumerate(legs[2]) if b != 0xFF]
    assert abs(sound[0] - added_at * 8) <= 10 * 160
    assert len(sound) >= len(TONE) // 2 - 10 * 160


async def test_srtp_call_is_decrypted_and_forged_packets_are_counted(tmp_path: Path) -> None:
    """An SBC recording over SRTP (RTP/SAVP keyed by SDES): the answer takes SAVP with a key of
    ours per m-line, the audio protected with the SBC's key is transcribed, and packets that
    fail authentication are dropped and counted while the call goes on."""
    key = bytes(range(30))
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target, srtp_key=key)
        body = ok.body.decode()
        assert body.count("RTP/SAVP") == 2
        ours = re.findall(r"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:(\S+)", body)
        assert len(ours) == 2 and len(set(ours)) == 2  # a fresh key per m-line
        assert base64.b64encode(key).decode() not in body
        ports = [("127.0.0.1", p) for p in answer_ports(ok)]
        forged = await play_rtp(ports[:1], [SILENCE[:1600]], srtp_key=bytes(30))  # wrong key
        await play_rtp(ports, [SILENCE, SILENCE], speed=4.0, srtp_key=key)
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        call = gw.registry.get(dialog.call_id)
        assert call is not None
        text = await gw.metrics()
        assert metric(text, "callgate_siprec_rtp_dropped_total", reason="srtp_rejected") == forged
        stored = gw.stored(call.call_id)
        assert _words(stored) == {0: "hello there goodbye", 1: "hello there goodbye"}
        client.close()


async def test_invite_from_outside_the_allowlist_is_403(tmp_path: Path) -> None:
    settings = siprec_settings(tmp_path, allowlist=["127.0.0.1/32"])
    async with siprec_gateway(settings, hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        outsider = await SipUdpClient.open("127.0.0.2")
        dialog = outsider.dialog(target)
        outsider.send(dialog.invite(), target)
        await outsider.expect(403)
        outsider.send(dialog.ack(), target)
        assert gw.registry.active_count == 0
        text = await gw.metrics()
        assert (
            metric(
                text, "callgate_streams_rejected_total", source="siprec", reason="not_in_allowlist"
            )
            == 1
        )
        # The allowed address still gets through.
        insider = await SipUdpClient.open("127.0.0.1")
        dialog, _ = await establish(insider, target)
        insider.send(dialog.bye(), target)
        await insider.expect(200)
        insider.close()
        outsider.close()


async def _tcp_exchange(port: int, data: bytes, within_s: float = 5.0) -> list[SipResponse]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parser = SipParser(max_body_bytes=1 << 16)
    out: list[SipResponse] = []
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within_s):
            while not out:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += [m for m in parser.feed(chunk) if isinstance(m, SipResponse)]
    finally:
        writer.close()
    return out


async def test_malformed_sip_is_answered_or_dropped_while_a_call_completes(
    tmp_path: Path,
) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        udp = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, udp)
        media = asyncio.create_task(
            play_rtp([("127.0.0.1", p) for p in answer_ports(ok)], [SILENCE, SILENCE], speed=2.0)
        )

        bad = await SipUdpClient.open()
        other = bad.dialog(udp)
        # A start line that is not SIP: nothing to answer to (dropped).
        bad.send(b"HELLO WORLD\r\n\r\n", udp)
        # No Call-ID: 400.
        bad.send(other.request("OPTIONS", in_dialog=False, omit=["Call-ID"]), udp)
        await bad.expect(400)
        # Content-Length larger than the datagram's body: 400.
        message = other.request("OPTIONS", in_dialog=False, body=b"v=0\r\n", cseq=2)
        bad.send(message.replace(b"Content-Length: 5", b"Content-Length: 500"), udp)
        await bad.expect(400)
        # A 1 MiB body over TCP: 413, the body skipped, the connection still usable.
        huge = other.request("OPTIONS", in_dialog=False, cseq=3, body=b"x" * (1 << 20))
        huge = huge.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
        replies = await _tcp_exchange(svc.sip_ports["tcp"], huge)
        assert [r.status for r in replies] == [413]

        await media
        client.send(dialog.bye(), udp)
        await client.expect(200)
        await gw.idle()
        call = gw.registry.get(dialog.call_id)
        assert call is not None
        stored = gw.stored(call.call_id)
        assert stored["state"] == "ended"
        assert _words(stored) == {0: "hello there goodbye", 1: "hello there goodbye"}
        text = await gw.metrics()
        errors = {
            reason: metric(text, "callgate_stream_errors_total", source="siprec", reason=reason)
            for reason in ("bad_start_line", "missing_header", "content_length_mismatch")
        }
        assert all(errors.values()), errors
        assert metric(
            text, "callgate_stream_errors_total", source="siprec", reason="body_too_large"
        ), text
        client.close()
        bad.close()


async def test_call_over_tcp(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        port = svc.sip_ports["tcp"]
        client = await SipTcpClient.open(port)
        dialog = client.dialog(("127.0.0.1", port))
        ok = await establish_stream(client, dialog)
        assert "transport=tcp" in (ok.headers.get("Contact") or "")
        await play_rtp([("127.0.0.1", p) for p in answer_ports(ok)], [SILENCE, SILENCE], speed=4.0)
        client.send(dialog.bye())
        await client.expect(200)
        client.close()
        await gw.idle()
        call = gw.registry.get(dialog.call_id)
        assert call is not None
        assert _words(gw.stored(call.call_id)) == {
            0: "hello there goodbye",
            1: "hello there goodbye",
        }


async def test_options_over_tls(tmp_path: Path) -> None:
    cert, key = await _self_signed(tmp_path, "localhost", "DNS:localhost")
    settings = siprec_settings(tmp_path, tls_port=0, tls_cert=str(cert), tls_key=str(key))
    async with siprec_gateway(settings, hello_engine()) as (_gw, svc):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        port = svc.sip_ports["tls"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        client = SipTcpClient(reader, writer)
        dialog = client.dialog(("127.0.0.1", port))
        dialog.transport = "TLS"
        client.send(dialog.request("OPTIONS", in_dialog=False))
        ok = await client.expect(200)
        assert "siprec" in (ok.headers.get("Supported") or "")
        # A call over TLS: our Contact names the TLS port (in-dialog requests go there), not
        # the UDP one.
        client.send(dialog.invite())
        await client.expect(100)
        answer = await client.expect(200)
        contact = answer.headers.get("Contact") or ""
        assert f"127.0.0.1:{port};transport=tls>" in contact, contact
        assert port != svc.sip_ports["udp"]
        dialog.to_tag = parse_name_addr(answer.headers.get("To") or "").tag
        client.send(dialog.ack())
        client.send(dialog.bye())
        await client.expect(200)
        client.close()


async def test_a_call_ended_by_the_gateway_sends_bye_until_answered(tmp_path: Path) -> None:
    # The gateway ends the call itself (maximum duration): the recording client gets a BYE in
    # the dialog, retransmitted over UDP until it answers, and the RTP ports are released.
    base = siprec_settings(tmp_path)
    settings = base.model_copy(update={"calls": base.calls.model_copy(update={"max_call_s": 1.0})})
    async with siprec_gateway(settings, hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        ports = answer_ports(ok)
        sender = asyncio.create_task(
            play_rtp([("127.0.0.1", p) for p in ports], [SILENCE, SILENCE], speed=1.0)
        )
        bye = await client.receive(within_s=5.0)
        assert isinstance(bye, SipRequest) and bye.method == "BYE"
        assert bye.call_id == dialog.call_id
        assert parse_name_addr(bye.headers.get("From") or "").tag == dialog.to_tag
        assert parse_name_addr(bye.headers.get("To") or "").tag == dialog.from_tag
        assert bye.uri.startswith("sip:src@127.0.0.1:")  # our Contact
        assert bye.cseq == (1, "BYE")
        again = await client.receive(within_s=1.5)  # unanswered: resent after T1
        assert isinstance(again, SipRequest) and again.to_bytes() == bye.to_bytes()
        client.send(build_response(bye, 200, "OK").to_bytes(), target)
        assert await client.quiet(1.5) == []  # answered: no more retransmissions
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await gw.idle()
        call = gw.registry.get(dialog.call_id)
        assert call is not None and call.end_reason == "max_duration"
        assert svc.ports.in_use == 0
        # The dialog is gone: the client's own late BYE gets 481.
        client.send(dialog.bye(), target)
        await client.expect(481)
        client.close()


async def test_an_invite_refused_after_admission_releases_its_call(tmp_path: Path) -> None:
    """No media ports left for a 3-stream offer: 503, and the call admitted for it is released
    at once (it used to hold a call slot until calls.max_call_s)."""
    settings = siprec_settings(tmp_path, rtp_port_min=42000, rtp_port_max=42003)  # 2 pairs
    async with siprec_gateway(settings, hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog = client.dialog(target)
        content_type, body = multipart(sdp_offer([30000, 30002, 30004]), None)
        invite = dialog.request("INVITE", body=body, content_type=content_type, in_dialog=False)
        client.send(invite, target)
        await client.expect(100)
        await client.expect(503)
        client.send(dialog.ack(), target)
        await gw.idle()
        assert gw.registry.active_count == 0
        assert svc.ports.in_use == 0
        client.close()


async def test_an_answer_that_cannot_be_built_is_a_500_not_a_wedged_dialog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails while answering an admitted INVITE, the client gets a final response and
    the call, its ports and its Call-ID are released. A non-ASCII a=label is answered (UTF-8)."""
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog = client.dialog(target)
        offer = sdp_offer([30000, 30002]).replace("a=label:2", "a=label:b\u00e9")
        content_type, body = multipart(offer, rs_metadata())
        invite = dialog.request("INVITE", body=body, content_type=content_type, in_dialog=False)
        client.send(invite, target)
        await client.expect(100)
        ok = await client.expect(200)
        assert "a=label:b\u00e9".encode() in ok.body
        dialog.to_tag = parse_name_addr(ok.headers.get("To") or "").tag
        client.send(dialog.ack(), target)
        client.send(dialog.bye(), target)
        await client.expect(200)

        def broken(call_id: str, now: float) -> list[object]:
            raise RuntimeError("boom")

        monkeypatch.setattr(svc.server, "accept", broken)
        second = client.dialog(target)
        client.send(second.invite((30010, 30012)), target)
        await client.expect(100)
        await client.expect(500)
        client.send(second.ack(), target)
        await gw.idle()
        assert gw.registry.active_count == 0 and svc.ports.in_use == 0
        assert svc.server.state(second.call_id) is None
        client.close()


async def test_an_offer_beyond_the_channel_limit_records_the_first_streams(
    tmp_path: Path,
) -> None:
    # Nine streams against calls.max_channels = 8: the first eight are recorded, the ninth gets
    # port 0 (the call used to be answered 200 with nine ports, then fail to start).
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target, ports=[30000 + 2 * i for i in range(9)])
        ports = [m.port for m in parse_sdp(ok.body).media]
        assert len(ports) == 9 and all(ports[:8]) and ports[8] == 0
        await poll_until(lambda: (c := gw.registry.get(dialog.call_id)) is not None and c.channels)
        call = gw.registry.get(dialog.call_id)
        assert call is not None and len(call.channels) == 8
        client.send(dialog.bye(), target)
        await client.expect(200)
        client.close()


async def test_a_call_that_breaks_sends_bye(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call refuses its media (a CallError): the recording session is ended with a BYE too,
    # so the client stops sending to a call that no longer takes it.
    async def refuse(self: Call, event: object) -> None:
        if isinstance(event, Audio):
            raise CallError("refused for the test")
        await real(self, event)

    real = Call.handle
    monkeypatch.setattr(Call, "handle", refuse)
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        sender = asyncio.create_task(
            play_rtp([("127.0.0.1", p) for p in answer_ports(ok)], [SILENCE, SILENCE])
        )
        bye = await client.receive(within_s=5.0)
        assert isinstance(bye, SipRequest) and bye.method == "BYE"
        assert bye.call_id == dialog.call_id
        client.send(build_response(bye, 200, "OK").to_bytes(), target)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await gw.idle()
        assert svc.ports.in_use == 0
        client.close()


async def test_forged_srtp_packets_do_not_capture_the_stream(tmp_path: Path) -> None:
    """Packets that fail SRTP authentication, from another socket, arriving before and during
    the SBC's media: the stream latches onto the authentic sender, none of its packets are
    dropped as coming from the wrong address, and the forged ones are counted as rejected."""
    key = bytes(range(30))
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target, srtp_key=key)
        ports = [("127.0.0.1", p) for p in answer_ports(ok)]
        call = svc._calls[dialog.call_id]

        async def forger() -> None:
            for _ in range(10):
                await play_rtp(ports[:1], [SILENCE[:320]], srtp_key=bytes(30))
                await asyncio.sleep(0.2)

        forging = asyncio.create_task(forger())
        await asyncio.sleep(0.05)  # the first forged packet arrives before any authentic one
        sent = await play_rtp(ports, [SILENCE, SILENCE], speed=1.0, srtp_key=key)
        await forging
        await asyncio.sleep(0.1)
        assert call.media is not None
        first = call.media.receivers[0]
        assert first.stats.accepted == sent  # every authentic packet was taken
        # The forged ones: refused by SRTP, or (once latched) by their source address.
        dropped = {s.channel: s.dropped for s in call.streams.values()}
        assert first.stats.srtp_rejected >= 1 and first.stats.srtp_rejected + dropped[0] == 10
        assert dropped[1] == 0
        client.send(dialog.bye(), target)
        await client.expect(200)
        client.close()


async def test_a_tcp_keepalive_ping_gets_a_pong(tmp_path: Path) -> None:
    # RFC 5626 4.4.1: SBCs keep their TCP flows alive with CRLFCRLF and drop a flow that never
    # answers; the recording server answers each ping with CRLF.
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (_gw, svc):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.sip_ports["tcp"])
        try:
            writer.write(b"\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
        finally:
            writer.close()
            await writer.wait_closed()


async def test_tcp_connections_are_capped_and_idle_ones_closed(tmp_path: Path) -> None:
    # Every TCP connection holds a task and buffers: beyond max_connections a new one is closed
    # at once, and one that sends nothing (not even a keep-alive) for tcp_idle_timeout_s is
    # closed, while one that keeps pinging stays open.
    settings = siprec_settings(tmp_path, max_connections=2, tcp_idle_timeout_s=0.6)
    async with siprec_gateway(settings, hello_engine()) as (gw, svc):
        port = svc.sip_ports["tcp"]
        pinging = await asyncio.open_connection("127.0.0.1", port)
        quiet = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(extra_reader.read(), 5) == b""  # closed at once
        extra_writer.close()
        for _ in range(5):  # a keep-alive every 0.3 s: alive for 1.5 s
            pinging[1].write(b"\r\n\r\n")
            assert await asyncio.wait_for(pinging[0].readexactly(2), 5) == b"\r\n"
            await asyncio.sleep(0.3)
        assert await asyncio.wait_for(quiet[0].read(), 5) == b""  # idle: closed
        for _, writer in (pinging, quiet):
            writer.close()
        metrics = await gw.metrics()
        for reason in ("too_many_connections", "idle_timeout"):
            value = metric(
                metrics, "callgate_streams_rejected_total", source="siprec", reason=reason
            )
            assert value == 1, reason


def _answering_sbc(
    received: asyncio.Queue[SipRequest],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An SBC's SIP listener (``asyncio.start_server``) that answers every request 200 and
    puts it on ``received``."""

    async def sbc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = SipParser()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while chunk := await reader.read(65536):
                for message in parser.feed(chunk):
                    if isinstance(message, SipRequest):
                        received.put_nowait(message)
                        writer.write(build_response(message, 200, "OK").to_bytes())
        writer.close()

    return sbc


async def test_our_bye_over_tcp_opens_a_new_connection_when_the_dialog_one_is_gone(
    tmp_path: Path,
) -> None:
    # The SBC closed its TCP connection after the ACK (idle timeout); the gateway then ends the
    # call (maximum duration): the BYE goes over a new connection to the SBC's Contact (RFC 3261
    # 18.1.1) instead of being dropped, and the SBC's 200 comes back on it.
    received: asyncio.Queue[SipRequest] = asyncio.Queue()
    listener = await asyncio.start_server(_answering_sbc(received), "127.0.0.1", 0)
    contact_port = int(listener.sockets[0].getsockname()[1])
    base = siprec_settings(tmp_path)
    settings = base.model_copy(update={"calls": base.calls.model_copy(update={"max_call_s": 1.0})})
    try:
        async with siprec_gateway(settings, hello_engine()) as (gw, svc):
            port = svc.sip_ports["tcp"]
            client = await SipTcpClient.open(port)
            dialog = client.dialog(("127.0.0.1", port))
            dialog.local = ("127.0.0.1", contact_port)  # our Contact: the SBC's listener
            await establish_stream(client, dialog)
            client.close()
            bye = await asyncio.wait_for(received.get(), 5.0)
            assert bye.method == "BYE" and bye.call_id == dialog.call_id
            await gw.idle()
            assert svc.ports.in_use == 0
    finally:
        listener.close()
        await listener.wait_closed()


class _LaggingSession:
    """A session that takes audio only once ``gate`` is set (everything else delegated)."""

    def __init__(self, inner: Any, gate: asyncio.Event) -> None:
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def send(self, audio: bytes) -> None:
        await self._gate.wait()
        await self._inner.send(audio)


class _LaggingEngine:
    """hello_engine() whose sessions wait at ``gate``: recognition lagging behind the call, as
    an overloaded local engine does (its bounded input queue pushes back on the call)."""

    def __init__(self, gate: asyncio.Event) -> None:
        self._inner = hello_engine()
        self._gate = gate
        self.name = self._inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_session(self, params: Any) -> _LaggingSession:
        return _LaggingSession(self._inner.open_session(params), self._gate)


async def test_audio_waiting_for_a_lagging_engine_is_bounded_and_the_legs_stay_aligned(
    tmp_path: Path,
) -> None:
    # UDP has no backpressure: while recognition lags, packets would queue without bound. With
    # max_backlog_s = 1 at most 1 s of 20 ms packets per stream waits; the rest is dropped,
    # counted, and becomes silence on the call clock, so both legs keep the call's length.
    gate = asyncio.Event()
    settings = siprec_settings(tmp_path, max_backlog_s=1.0)
    async with siprec_gateway(settings, _LaggingEngine(gate)) as (gw, svc):
        target = ("127.0.0.1", svc.sip_ports["udp"])
        client = await SipUdpClient.open()
        dialog, ok = await establish(client, target)
        audio = [SILENCE + SILENCE, SILENCE + SILENCE]  # 4 s per leg
        player = asyncio.create_task(play_rtp([("127.0.0.1", p) for p in answer_ports(ok)], audio))
        call = svc._calls[dialog.call_id]
        peak = 0
        loop = asyncio.get_running_loop()
        opens_at = loop.time() + 2.5
        while not player.done():
            peak = max(peak, len(call.queue))
            if not gate.is_set() and loop.time() >= opens_at:
                gate.set()  # recognition catches up for the last 1.5 s
            await asyncio.sleep(0.01)
        assert await player == 200
        client.send(dialog.bye(), target)
        await client.expect(200)
        await gw.idle()
        assert 100 <= peak <= 102  # 2 streams x 50 packets, plus the call's own events
        text = await gw.metrics()
        dropped = metric(text, "callgate_siprec_rtp_dropped_total", reason="backlog")
        assert 100 <= dropped <= 250  # about 1.5 s of both legs, while the queue was full
        ended = gw.registry.get(dialog.call_id)
        assert ended is not None
        stored = gw.stored(ended.call_id)
        assert stored["state"] == "ended"
        legs = list(ended.channels.values())
        assert [c.duration_ms for c in legs] == [stored["duration_ms"]] * 2
        assert 3900 <= stored["duration_ms"] <= 4100
        assert all(1000 <= c.filled_ms <= 2500 for c in legs)  # the dropped stretch
        assert _words(stored) == {0: "hello there goodbye", 1: "hello there goodbye"}
        client.close()


async def _self_signed(tmp: Path, name: str, san: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail(
            "openssl not found: install it with `sudo scripts/install-system-deps.sh`",
            pytrace=False,
        )
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    proc = await asyncio.create_subprocess_exec(
        *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
        *("-nodes", "-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", "-days", "1"),
        *("-keyout", str(key), "-out", str(cert)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await proc.wait() == 0
    return cert, key


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_our_bye_over_tls_opens_a_verified_connection_when_the_dialog_one_is_gone(
    tmp_path: Path, trusted: bool
) -> None:
    # As over TCP, but the new connection is TLS, and the SBC's certificate must chain to
    # siprec.tls_ca and name the Contact's host: an SBC we cannot verify gets no BYE (the SIP
    # would go in the clear to whoever answers), and the call still ends on our side.
    gw_cert, gw_key = await _self_signed(tmp_path, "srs", "DNS:localhost")
    sbc_cert, sbc_key = await _self_signed(tmp_path, "sbc", "IP:127.0.0.1")
    received: asyncio.Queue[SipRequest] = asyncio.Queue()
    sbc_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sbc_tls.load_cert_chain(sbc_cert, sbc_key)
    listener = await asyncio.start_server(_answering_sbc(received), "127.0.0.1", 0, ssl=sbc_tls)
    contact_port = int(listener.sockets[0].getsockname()[1])
    base = siprec_settings(
        tmp_path,
        tls_port=0,
        tls_cert=str(gw_cert),
        tls_key=str(gw_key),
        tls_ca=str(sbc_cert if trusted else gw_cert),
    )
    settings = base.model_copy(update={"calls": base.calls.model_copy(update={"max_call_s": 1.0})})
    client_tls = ssl.create_default_context()
    client_tls.check_hostname = False
    client_tls.verify_mode = ssl.CERT_NONE
    try:
        async with siprec_gateway(settings, hello_engine()) as (gw, svc):
            port = svc.sip_ports["tls"]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
            client = SipTcpClient(reader, writer)
            dialog = client.dialog(("127.0.0.1", port))
            dialog.transport = "TLS"
            dialog.local = ("127.0.0.1", contact_port)  # our Contact: the SBC's TLS listener
            await establish_stream(client, dialog)
            client.close()
            if trusted:
                bye = await asyncio.wait_for(received.get(), 5.0)
                assert bye.method == "BYE" and bye.call_id == dialog.call_id
            await gw.idle()
            if not trusted:
                await asyncio.sleep(1.0)  # the BYE's retransmissions had their chance
                assert received.empty()
            assert svc.ports.in_use == 0
            ended = gw.registry.get(dialog.call_id)
            assert ended is not None and gw.stored(ended.call_id)["state"] == "ended"
    finally:
        listener.close()
        await listener.wait_closed()
