"""SIPREC end to end with a real SIP peer: sipp (Debian `sip-tester`) plays the Session Recording
Client from tests/sipp/siprec_uac.xml (INVITE with SDP + rs-metadata, ACK, the call, hold and
resume re-INVITEs, BYE) against `gateway serve` on loopback, while this test sends the two RTP
streams (PCMU, real time) to the ports of the gateway's answer, as the SBC's media would.

The corpus test plays each transcribed corpus call's two channels through the embedded engine
and holds the stored transcripts to the same bars as the Twilio path
(tests/test_serve_corpus.py, tests/test_transcribe_corpus.py). sipp itself checks that the
answers are recvonly with the m-lines in the offer's order (and a=inactive on hold); the test
checks the same in sipp's message trace.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.calls.call import Call, CallOutput, CallState, CallUpdated
from gateway.ingress.siprec.service import SiprecService
from gateway.simulate.twilio import load_call_audio
from gateway.stt.local import LocalEngine
from gateway.transcript.model import Transcript
from tests.conftest import ROOT, TRANSCRIBED_CALLS, call_path
from tests.gateway_server import Gateway, hello_engine, poll_until
from tests.siprec_peer import NAMES, play_rtp, siprec_gateway, siprec_settings
from tests.test_transcribe_corpus import assert_meets_bars

SIPP = shutil.which("sipp")
SCENARIO = ROOT / "tests" / "sipp" / "siprec_uac.xml"
# sipp holds the call this long after the audio's length (its -d pause, from the ACK), then
# resumes it and hangs up 0.5 s later. The RTP is played by the test's own loop, which also
# runs the gateway and, in the corpus test, six local-engine channels on two cores, so the
# margin is generous; a player that still runs past the BYE fails with its own message.
HOLD_MARGIN_MS = 5000


def _free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sipp:
    """One sipp run of the scenario (one call)."""

    proc: asyncio.subprocess.Process
    prefix: str
    messages: Path
    errors: Path

    async def finish(self, within_s: float) -> int:
        async with asyncio.timeout(within_s):
            return await self.proc.wait()

    def trace(self) -> str:
        return self.messages.read_text(errors="replace") if self.messages.exists() else ""


async def start_sipp(sip_port: int, prefix: str, pause_ms: int, workdir: Path) -> Sipp:
    if SIPP is None:
        pytest.fail(
            "sipp not found: these tests need Debian's sip-tester package; install it with "
            "`sudo scripts/install-system-deps.sh`",
            pytrace=False,
        )
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    messages, errors = workdir / "messages.log", workdir / "errors.log"
    args = [
        f"127.0.0.1:{sip_port}",
        "-sf",
        str(SCENARIO),
        "-i",
        "127.0.0.1",
        "-p",
        str(_free_port()),
        "-mp",
        str(_free_port()),
        "-m",
        "1",
        "-d",
        str(pause_ms),
        "-cid_str",
        f"{prefix}-%u@%s",
        "-nostdin",
        "-trace_msg",
        "-message_file",
        str(messages),
        "-trace_err",
        "-error_file",
        str(errors),
        "-timeout",
        "300s",
        "-timeout_error",
    ]
    with (workdir / "screen.log").open("wb") as screen:
        proc = await asyncio.create_subprocess_exec(
            SIPP, *args, cwd=workdir, stdin=asyncio.subprocess.DEVNULL, stdout=screen, stderr=screen
        )
    return Sipp(proc, prefix, messages, errors)


async def answer_ports(svc: SiprecService, prefix: str, within_s: float = 10.0) -> list[int]:
    """The RTP ports the gateway answered sipp's call with (read on the gateway side)."""
    found: list[int] = []

    def ready() -> bool:
        for call_id in svc.server.calls:
            if call_id.startswith(prefix) and svc.media_ports(call_id):
                found[:] = svc.media_ports(call_id)
                return True
        return False

    await poll_until(ready, within_s)
    return found


def check_answers(trace: str) -> list[str]:
    """The SDP bodies of the 200 OKs to sipp's INVITEs, each checked: two recvonly (inactive
    on hold) m-lines, label 1 then label 2."""
    answers = []
    for block in re.split(r"-{5,}[^\n]*\n", trace):
        # "UDP message received [923] bytes :", a blank line, then the message.
        head, _, message = block.partition("\n")
        message = message.lstrip()
        if "received" not in head or not message.startswith("SIP/2.0 200"):
            continue
        if not re.search(r"^CSeq: *\d+ INVITE", message, re.MULTILINE):
            continue
        sdp = message[message.index("v=0") :]
        lines = [ln.strip() for ln in sdp.splitlines()]
        mlines = [ln for ln in lines if ln.startswith("m=audio")]
        directions = [ln for ln in lines if ln in ("a=recvonly", "a=inactive", "a=sendrecv")]
        labels = [ln for ln in lines if ln.startswith("a=label:")]
        assert len(mlines) == 2 and labels == ["a=label:1", "a=label:2"], sdp
        assert directions in (["a=recvonly"] * 2, ["a=inactive"] * 2), sdp
        answers.append(directions[0])
    return answers


async def _sipp_call(
    gw: Gateway, svc: SiprecService, tmp: Path, name: str, pcm: tuple[bytes, bytes]
) -> tuple[Sipp, str]:
    """Run one sipp call playing ``pcm`` (two channels); returns the run and its call id."""
    seconds = len(pcm[0]) / 2 / 8000
    sipp = await start_sipp(
        svc.sip_ports["udp"], name, int(seconds * 1000) + HOLD_MARGIN_MS, tmp / f"sipp-{name}"
    )
    ports = await answer_ports(svc, name)
    await play_rtp([("127.0.0.1", p) for p in ports], list(pcm))
    call = gw.registry.get(next(c for c in _sip_ids(gw) if c.startswith(name)))
    # sipp holds, resumes and hangs up on its own clock: RTP arriving after its BYE is lost.
    assert call is not None and call.state is CallState.ACTIVE, (
        f"{name}: the RTP ran past sipp's BYE (pause + {HOLD_MARGIN_MS} ms); the machine was "
        "too loaded for this test's timing"
    )
    rc = await sipp.finish(within_s=60)
    assert rc == 0, (sipp.errors.read_text() if sipp.errors.exists() else "", sipp.trace()[-3000:])
    return sipp, next(c for c in _sip_ids(gw) if c.startswith(name))


def _sip_ids(gw: Gateway) -> list[str]:
    ids = []
    for call in [*(lv.call for lv in gw.registry.active()), *gw.registry.recent()]:
        ids.append(call.source_ids.get("sip_call_id", ""))
    return ids


async def test_sipp_siprec_call_hold_resume_bye(tmp_path: Path) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), hello_engine()) as (gw, svc):
        updates: list[str] = []

        def listener(call: Call, output: CallOutput) -> None:
            if isinstance(output, CallUpdated):
                updates.append(output.change)

        gw.registry.add_listener(listener)
        silence = b"\x00\x00" * 16000
        sipp, sip_call_id = await _sipp_call(gw, svc, tmp_path, "short", (silence, silence))
        assert check_answers(sipp.trace()) == ["a=recvonly", "a=inactive", "a=recvonly"]
        await gw.idle()
        call = gw.registry.get(sip_call_id)
        assert call is not None
        stored = gw.stored(call.call_id)
        assert stored["state"] == "ended" and stored["end_reason"] == "bye"
        assert [(c["role"], c["participant"]) for c in stored["channels"]] == [
            ("customer", NAMES[0]),
            ("agent", NAMES[1]),
        ]
        assert [u["text"] for u in stored["utterances"]] == [
            "hello there",
            "hello there",
            "goodbye",
            "goodbye",
        ]
        assert updates == ["hold", "resume"]


@pytest.mark.slow
async def test_sipp_siprec_corpus_calls_meet_the_bars(
    local_engine: LocalEngine, tmp_path: Path
) -> None:
    async with siprec_gateway(siprec_settings(tmp_path), local_engine) as (gw, svc):
        jobs = []
        for name in TRANSCRIBED_CALLS:
            audio = await load_call_audio(call_path(name))
            assert audio.outbound is not None
            pcm = (audio.inbound, audio.outbound)
            jobs.append(_sipp_call(gw, svc, tmp_path, name.replace("_", "-"), pcm))
        runs = await asyncio.gather(*jobs)
        await gw.idle(within_s=240)
        transcripts: list[Transcript] = []
        for sipp, sip_call_id in runs:
            assert check_answers(sipp.trace()) == ["a=recvonly", "a=inactive", "a=recvonly"]
            call = gw.registry.get(sip_call_id)
            assert call is not None
            stored = gw.stored(call.call_id)
            assert stored["state"] == "ended"
            assert [c["participant"] for c in stored["channels"]] == list(NAMES)
            transcripts.append(call.transcript())

    for name, transcript in zip(TRANSCRIBED_CALLS, transcripts, strict=True):
        # Each RTP stream is anchored at its first packet's arrival (varies by a few samples).
        await assert_meets_bars(name, transcript, arrival_aligned=True)
