"""Benchmark: N concurrent SIPREC calls (SIP over UDP + two RTP streams each) into one gateway.

The same harness as bench/twilio_calls.py (whose helpers it imports, as bench/stereo_streams.py
does):

* the gateway: ``gateway serve`` with ``[siprec]`` enabled -- the process measured -- and the
  AssemblyAI engine pointed at
* a peer: ``gateway stt-server --engine scripted`` (a two-word turn every 3 s, so finals flow);
* the callers: this file's ``_simulate`` role, a Session Recording Client: per call one SIP
  INVITE (multipart SDP with two sendonly PCMU m-lines + rs-metadata), ACK, then two RTP streams
  (20 ms PCMU packets, one per leg of ``samples/diane_sheila.wav`` looped to length) at real
  time to the ports of the gateway's answer, then BYE. All streams are driven by one ticker
  that spreads the calls over each 20 ms (each call sends in one of 10 sub-ticks, as streams on
  independent clocks would); the calls' starts are spread over ``--ramp`` s (default
  max(5, N/25)). With
  ``--srtp`` the m-lines are RTP/SAVP keyed by SDES and every packet is protected by libsrtp
  (AES_CM_128_HMAC_SHA1_80), so the gateway authenticates and decrypts each one.

The gateway is pinned to one core (``--gateway-core``), everything else to the others. After one
warm-up call the baseline is taken; then the N calls start, and the window (``--seconds``) opens
``--settle`` s after the last start. Over the window: the gateway's CPU (utime + stime / wall),
memory (VmRSS median - baseline, per call), RTP packets it handled per call-second
(``callgate_media_frames_total{source="siprec"}``, 100 expected), the packet-to-clock delay
(``callgate_siprec_packet_delay_seconds``: from a packet's arrival on its socket to its audio
placed on the call clock, sampled every 10th packet), the delay from a chunk's last frame to the
STT socket (``callgate_stt_send_delay_seconds``), refusals and stream errors.

    .venv/bin/python bench/siprec_calls.py [--calls 50,100,300] [--seconds 30] [--srtp]
        [--json FILE]

Target (issue 7): 300 concurrent SIPREC calls on one core at real time; report CPU and memory
per call and the packet-to-clock delay.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import secrets
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pylibsrtp  # noqa: E402
import twilio_calls as tc  # noqa: E402 - the shared harness (bench/ is not a package)

FRAME_MS = 20
SLOTS = 10  # sub-ticks per 20 ms frame over which the calls' packets are spread
STEP = 8 * FRAME_MS  # samples (bytes of PCMU) per packet
PACKETS_PER_CALL_S = 2 * 1000 // FRAME_MS  # two streams
BOUNDARY = "benchBoundary"

# -- the callers (a child process) ---------------------------------------------------------------


def _offer(
    local: tuple[str, int], target: tuple[str, int], call_id: str, tag: str, key: bytes | None
) -> bytes:
    """The INVITE; with ``key``, SRTP (RTP/SAVP, AES_CM_128_HMAC_SHA1_80 keyed by it)."""
    proto = "RTP/AVP" if key is None else "RTP/SAVP"
    crypto = (
        ""
        if key is None
        else f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{base64.b64encode(key).decode()}\r\n"
    )
    sdp = (
        "v=0\r\no=bench 1 1 IN IP4 127.0.0.1\r\ns=SIPREC\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        + "".join(
            f"m=audio {30000 + 2 * i} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
            f"a=sendonly\r\na=label:{i + 1}\r\n{crypto}"
            for i in range(2)
        )
    )
    metadata = (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n'
        '<recording xmlns="urn:ietf:params:xml:ns:recording:1"><datamode>complete</datamode>'
        '<session session_id="s"/>'
        '<participant participant_id="a"><nameID aor="sip:caller@bench"><name>Caller</name>'
        "</nameID></participant>"
        '<participant participant_id="b"><nameID aor="sip:agent@bench"><name>Agent</name>'
        "</nameID></participant>"
        '<stream stream_id="s1" session_id="s"><label>1</label></stream>'
        '<stream stream_id="s2" session_id="s"><label>2</label></stream>'
        '<participantstreamassoc participant_id="a"><send>s1</send></participantstreamassoc>'
        '<participantstreamassoc participant_id="b"><send>s2</send></participantstreamassoc>'
        "</recording>\r\n"
    )
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/sdp\r\n\r\n{sdp}"
        f"--{BOUNDARY}\r\nContent-Type: application/rs-metadata+xml\r\n\r\n{metadata}"
        f"--{BOUNDARY}--\r\n"
    ).encode()
    return _request(
        "INVITE",
        local,
        target,
        call_id,
        tag,
        None,
        1,
        body,
        f"multipart/mixed;boundary={BOUNDARY}",
    )


def _request(
    method: str,
    local: tuple[str, int],
    target: tuple[str, int],
    call_id: str,
    tag: str,
    to_tag: str | None,
    cseq: int,
    body: bytes = b"",
    content_type: str | None = None,
) -> bytes:
    to = f"<sip:srs@{target[0]}:{target[1]}>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} sip:srs@{target[0]}:{target[1]} SIP/2.0",
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK{secrets.token_hex(6)}",
        "Max-Forwards: 70",
        f"From: <sip:sbc@{local[0]}>;tag={tag}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        f"Contact: <sip:sbc@{local[0]}:{local[1]}>;+sip.src",
    ]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class _Call:
    call_id: str
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    to_tag: str | None = None
    ports: list[int] = field(default_factory=list)
    sock: socket.socket | None = None
    start_tick: int = 0
    ssrc: tuple[int, int] = (0, 0)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0
    protect: Callable[[bytes], bytes] | None = None  # SRTP (libsrtp) when --srtp
    phase: int = field(default_factory=lambda: secrets.randbelow(SLOTS))  # its sub-tick


class _Sip(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiters: dict[tuple[str, str], asyncio.Future[Any]] = {}

    def datagram_received(self, data: bytes, addr: Any) -> None:
        from gateway.ingress.siprec.message import SipParser, SipResponse

        msg = SipParser().feed_datagram(data)
        if not isinstance(msg, SipResponse) or msg.status < 200:
            return
        method = (msg.headers.get("CSeq") or "0 ?").split()[-1]
        fut = self.waiters.pop((msg.call_id, method), None)
        if fut is not None and not fut.done():
            fut.set_result(msg)


async def _simulate(args: argparse.Namespace) -> None:
    """Warm up with one short call, wait for "go" on stdin, play the N calls."""
    from gateway.ingress.siprec.message import parse_name_addr
    from gateway.media.codec import Codec, encode
    from gateway.simulate.twilio import load_call_audio

    loop = asyncio.get_running_loop()
    target = ("127.0.0.1", args.sip_port)
    transport, sip = await loop.create_datagram_endpoint(_Sip, local_addr=("127.0.0.1", 0))
    local = transport.get_extra_info("sockname")[:2]
    audio = await load_call_audio(Path(args.audio))
    legs: list[bytes] = []
    long = tc._looped(audio, args.audio_seconds)
    legs = [encode(Codec.PCMU, long.inbound), encode(Codec.PCMU, long.outbound)]
    active: dict[str, _Call] = {}
    tick = 0
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        # Every 20 ms frame is cut into SLOTS sub-ticks, and each call sends in the one its
        # phase names: an SBC's streams run on independent clocks, so the gateway sees packets
        # spread over the frame, not one burst of every call's packets per 20 ms (which it
        # would read in far fewer wake-ups, under-counting its CPU per call).
        nonlocal tick
        t0 = loop.time()
        sub = 0
        frames = min(len(leg) for leg in legs) // STEP
        while running:
            sub += 1
            tick, slot = divmod(sub, SLOTS)
            due = t0 + sub * FRAME_MS / 1000 / SLOTS
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, loop.time() - due))
            for call in list(active.values()):
                if call.phase != slot:
                    continue
                i = tick - call.start_tick
                if i < 0:
                    continue
                if i >= min(frames, call_frames[call.call_id]):
                    del active[call.call_id]
                    call.done.set()
                    continue
                assert call.sock is not None
                for k in range(2):
                    payload = legs[k][i * STEP : (i + 1) * STEP]
                    packet = (
                        struct.pack(
                            "!BBHII", 0x80, 0, i & 0xFFFF, (i * STEP) & 0xFFFFFFFF, call.ssrc[k]
                        )
                        + payload
                    )
                    if call.protect is not None:
                        packet = call.protect(packet)
                    with contextlib.suppress(BlockingIOError):
                        call.sock.sendto(packet, ("127.0.0.1", call.ports[k]))
                call.sent += 2

    call_frames: dict[str, int] = {}

    async def ask(call: _Call, method: str, data: bytes, within_s: float = 15.0) -> Any:
        fut: asyncio.Future[Any] = loop.create_future()
        sip.waiters[(call.call_id, method)] = fut
        for _ in range(4):
            transport.sendto(data, target)
            done, _ = await asyncio.wait({fut}, timeout=within_s / 4)
            if done:
                return fut.result()
        sip.waiters.pop((call.call_id, method), None)
        return None

    async def one_call(seconds: float) -> dict[str, Any]:
        call = _Call(f"{secrets.token_hex(8)}@bench")
        key = secrets.token_bytes(30) if args.srtp else None
        if key is not None:
            policy = pylibsrtp.Policy(
                key=key,
                ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
            )
            call.protect = pylibsrtp.Session(policy=policy).protect
        ok = await ask(call, "INVITE", _offer(local, target, call.call_id, call.tag, key))
        if ok is None:
            return {"completed": False, "error": "no answer"}
        call.to_tag = parse_name_addr(ok.headers.get("To") or "").tag
        ack = _request("ACK", local, target, call.call_id, call.tag, call.to_tag, 1)
        transport.sendto(ack, target)
        if ok.status != 200:
            return {"completed": False, "rejected": ok.status}
        call.ports = [int(p) for p in re.findall(rb"^m=audio (\d+) ", ok.body, re.MULTILINE)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        call.sock = sock
        call.ssrc = (secrets.randbits(32), secrets.randbits(32))
        call_frames[call.call_id] = int(seconds * 1000 / FRAME_MS)
        started = loop.time()
        call.start_tick = tick + 1
        active[call.call_id] = call
        await call.done.wait()
        elapsed = loop.time() - started
        sock.close()
        bye = _request("BYE", local, target, call.call_id, call.tag, call.to_tag, 2)
        answer = await ask(call, "BYE", bye)
        return {
            "completed": answer is not None and answer.status == 200,
            "audio_s": call_frames[call.call_id] * FRAME_MS / 1000,
            "elapsed_s": elapsed,
            "packets": call.sent,
        }

    ticking = asyncio.create_task(ticker())
    warm = await one_call(3.0)
    print(json.dumps({"warm": warm["completed"], "detail": warm}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    lags.clear()
    t0 = time.monotonic()
    stagger = args.ramp / args.calls

    async def delayed(i: int) -> dict[str, Any]:
        await asyncio.sleep(i * stagger)
        return await one_call(args.audio_seconds - i * stagger)

    results = await asyncio.gather(*(delayed(i) for i in range(args.calls)))
    running = False
    await ticking
    lags.sort()
    behind = [r["elapsed_s"] - r["audio_s"] for r in results if "elapsed_s" in r]
    print(
        json.dumps(
            {
                "calls": len(results),
                "completed": sum(bool(r["completed"]) for r in results),
                "rejected": dict(Counter(str(r["rejected"]) for r in results if "rejected" in r)),
                "errors": dict(Counter(r["error"] for r in results if "error" in r)),
                "audio_s": round(max((r.get("audio_s", 0.0) for r in results), default=0.0), 2),
                "overrun_s_max": round(max(behind, default=0.0), 3),
                "sender_lag_ms_p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1)
                if lags
                else None,
                "wall_s": round(time.monotonic() - t0, 1),
            }
        ),
        flush=True,
    )
    transport.close()


# -- one run -------------------------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_one(
    n: int, args: argparse.Namespace, gw_cores: set[int], load_cores: set[int]
) -> dict[str, Any]:
    ramp_s = args.ramp if args.ramp is not None else max(5.0, n / 25)
    audio_s = ramp_s + args.settle + args.seconds + args.tail
    script_turns = tc.stt_script(audio_s)
    children: list[tc.Child] = []
    sip_port = _free_udp_port()
    with tempfile.TemporaryDirectory(prefix="callgate-bench-") as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script_turns))
        try:
            with (
                open(Path(tmp) / "gw.log", "wb") as gw_log,
                open(Path(tmp) / "peer.log", "wb") as peer_log,
            ):
                quiet = {"GATEWAY_LOGGING__LEVEL": "warning", "GATEWAY_LOGGING__FORMAT": "json"}
                peer = tc.Child(
                    "stt-server",
                    [sys.executable, "-m", "gateway", "stt-server", "--engine", "scripted"]
                    + ["--script", str(script_path), "--host", "127.0.0.1", "--port", "0"],
                    cores=load_cores,
                    env=tc.clean_env(quiet),
                    stderr=peer_log,
                )
                children.append(peer)
                stt_url = peer.readline(60, "listening line").strip().rsplit(" ", 1)[-1]
                gw_env = tc.clean_env(
                    {
                        **quiet,
                        "GATEWAY_STT__ENGINE": "assemblyai",
                        "GATEWAY_STT__ASSEMBLYAI__URL": stt_url,
                        "GATEWAY_SERVER__MAX_CALLS": str(n + 10),
                        "GATEWAY_SERVER__DATA_DIR": str(Path(tmp) / "data"),
                        "GATEWAY_SIPREC__ENABLED": "true",
                        "GATEWAY_SIPREC__HOST": "127.0.0.1",
                        "GATEWAY_SIPREC__TRANSPORTS": '["udp"]',
                        "GATEWAY_SIPREC__UDP_PORT": str(sip_port),
                        "GATEWAY_SIPREC__ALLOWLIST": '["127.0.0.0/8"]',
                        "GATEWAY_SIPREC__RTP_PORT_MIN": "40000",
                        "GATEWAY_SIPREC__RTP_PORT_MAX": str(40000 + 4 * (n + 20)),
                    }
                )
                profile = args.profile / f"gateway-{n}.prof" if args.profile else None
                cmd = [*tc.gateway_command(False, profile), "serve", "--host", "127.0.0.1"]
                gw = tc.Child(
                    "gateway", [*cmd, "--port", "0"], cores=gw_cores, env=gw_env, stderr=gw_log
                )
                children.append(gw)
                while "serving on" not in (line := gw.readline(120, "serving banner")):
                    pass
                port = int(line.rsplit(":", 1)[1])
                base = f"http://127.0.0.1:{port}"
                tc.pin(gw.proc.pid, gw_cores)
                sim = tc.Child(
                    "simulator",
                    [sys.executable, __file__, "_simulate", "--sip-port", str(sip_port)]
                    + ["--calls", str(n), "--audio", str(args.audio)]
                    + ["--audio-seconds", str(audio_s), "--ramp", str(ramp_s)]
                    + (["--srtp"] if args.srtp else []),
                    cores=load_cores,
                    env=tc.clean_env({}),
                    stderr=None,
                    stdin=True,
                )
                children.append(sim)
                measured = tc.measure_window(
                    gw,
                    peer,
                    sim,
                    base,
                    gw_cores,
                    ramp_s=ramp_s,
                    settle=args.settle,
                    seconds=args.seconds,
                    audio_s=audio_s,
                )
        finally:
            for child in reversed(children):
                child.stop(timeout=10)

    baseline, final, base_proc = measured.baseline, measured.final, measured.base_proc
    hwm, sim_result = measured.hwm_kib, measured.sim_result
    f = tc.window_figures(measured, gw_cores)
    wall, gw_cpu, load_cpu, steady_rss = f.wall, f.gw_cpu, f.load_cpu, f.steady_rss
    core_other, m0, m1 = f.core_other, f.m0, f.m1
    send_delay = tc.histogram_delta(m0, m1, "callgate_stt_send_delay_seconds") if m0 and m1 else []
    packet_delay = (
        tc.histogram_delta(m0, m1, "callgate_siprec_packet_delay_seconds") if m0 and m1 else []
    )
    frames = (
        m1.value("callgate_media_frames_total", source="siprec")
        - m0.value("callgate_media_frames_total", source="siprec")
        if m0 and m1
        else 0.0
    )

    def labelled(name: str, key: str) -> dict[str, int]:
        return tc.labelled_delta(baseline, final, name, key)

    # Call i plays audio_s - i * stagger seconds (the staggered calls end together).
    stagger = ramp_s / n
    per_call_turns = [
        sum(1 for t in script_turns if t[-1][2] <= (audio_s - i * stagger) * 1000) for i in range(n)
    ]
    return {
        "ingress": "siprec",
        "calls": n,
        "window_s": round(wall, 1),
        "metrics_answered_in_window": m0 is not None,
        "active_at_window_start": int(m0.value("callgate_calls_active")) if m0 else None,
        "active_at_window_end": int(m1.value("callgate_calls_active")) if m1 else None,
        "gateway_cpu_percent_of_core": round(100 * gw_cpu, 1),
        "cpu_percent_of_core_per_call": round(100 * gw_cpu / n, 3),
        "cpu_ms_per_call_second": round(1000 * gw_cpu / n, 3),
        "load_cores_cpu_percent": round(100 * load_cpu, 1),
        "other_cpu_on_gateway_core_percent": round(100 * core_other, 1),
        "rss_baseline_mib": round(base_proc.rss_kib / 1024, 1),
        "rss_steady_mib": round(steady_rss / 1024, 1),
        "rss_peak_mib": round(hwm / 1024, 1),
        "memory_per_call_kib": round((steady_rss - base_proc.rss_kib) / n, 1),
        "frames_per_call_s": round(frames / (m1.at - m0.at) / n, 2) if m0 and m1 else 0.0,
        "frames_per_call_s_expected": PACKETS_PER_CALL_S,
        "packet_to_clock_ms_p50": tc.ms(tc.quantile(packet_delay, 0.5)),
        "packet_to_clock_ms_p99": tc.ms(tc.quantile(packet_delay, 0.99)),
        "send_delay_ms_p50": tc.ms(tc.quantile(send_delay, 0.5)),
        "send_delay_ms_p99": tc.ms(tc.quantile(send_delay, 0.99)),
        "metrics_response_ms_max": round(
            1000 * max((sc.took for sc in measured.scrapes), default=0), 1
        ),
        "simulator": sim_result,
        "calls_finished": labelled("callgate_calls_ended_total", "outcome"),
        "finals": int(
            final.value("callgate_turn_finals_total") - baseline.value("callgate_turn_finals_total")
        ),
        "finals_expected": 2 * sum(per_call_turns),
        "stream_errors": labelled("callgate_stream_errors_total", "reason"),
        "streams_rejected": labelled("callgate_streams_rejected_total", "reason"),
        "loadavg_at_end": tc.loadavg(),
    }


def verdict(r: dict[str, Any]) -> list[str]:
    """Why this run fell behind real time or lost something (empty: it kept up)."""
    problems = []
    if r["frames_per_call_s"] < 0.97 * r["frames_per_call_s_expected"]:
        problems.append(f"gateway got {r['frames_per_call_s']} packets/call/s (not real time)")
    if not r["metrics_answered_in_window"]:
        problems.append("no /metrics answer within the window")
    elif min(r["active_at_window_start"], r["active_at_window_end"]) < r["calls"]:
        problems.append("not all calls active in the window")
    if r["gateway_cpu_percent_of_core"] > 90:
        problems.append("gateway core saturated")
    sim = r["simulator"]
    if sim["completed"] < r["calls"]:
        problems.append(f"{r['calls'] - sim['completed']} calls did not complete")
    if (sim.get("sender_lag_ms_p99") or 0) > 20:
        problems.append(f"the RTP sender itself lagged (p99 {sim['sender_lag_ms_p99']} ms)")
    for key in ("stream_errors", "streams_rejected"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    if r["other_cpu_on_gateway_core_percent"] > 5:
        problems.append(
            f"DISTURBED: other work took {r['other_cpu_on_gateway_core_percent']}% of the core"
        )
    return problems


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'calls':>5} {'gw CPU':>7} {'CPU/call':>9} {'ms/call-s':>9} {'KiB/call':>8} "
        f"{'peak MiB':>8} {'pkt p50':>7} {'pkt p99':>7} {'pk/c/s':>6} {'done':>9} "
        f"{'finals':>13}  verdict"
    )
    lines = [head]
    for r in results:
        sim = r["simulator"]

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        lines.append(
            f"{r['calls']:>5} {r['gateway_cpu_percent_of_core']:>6.1f}% "
            f"{r['cpu_percent_of_core_per_call']:>8.3f}% {r['cpu_ms_per_call_second']:>9.2f} "
            f"{r['memory_per_call_kib']:>8.0f} {r['rss_peak_mib']:>8.0f} "
            f"{fmt(r['packet_to_clock_ms_p50']):>7} {fmt(r['packet_to_clock_ms_p99']):>7} "
            f"{r['frames_per_call_s']:>6.1f} "
            f"{sim['completed']:>4}/{r['calls']:<4} {r['finals']:>6}/{r['finals_expected']:<6}  "
            + ("real time" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"]))
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_simulate":
        p = argparse.ArgumentParser()
        p.add_argument("_role")
        p.add_argument("--sip-port", type=int, required=True)
        p.add_argument("--calls", type=int, required=True)
        p.add_argument("--audio", required=True)
        p.add_argument("--audio-seconds", type=float, required=True)
        p.add_argument("--ramp", type=float, required=True)
        p.add_argument("--srtp", action="store_true")
        from gateway.observability.logging import configure_logging

        configure_logging("warning")
        asyncio.run(_simulate(p.parse_args()))
        return 0

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", default="50,100,300", help="comma-separated N")
    parser.add_argument("--seconds", type=float, default=30, help="steady-state window (s)")
    parser.add_argument("--ramp", type=float, help="starts spread over this (default max(5, N/25))")
    parser.add_argument("--settle", type=float, default=3)
    parser.add_argument("--tail", type=float, default=8)
    parser.add_argument("--audio", type=Path, default=ROOT / "samples" / "diane_sheila.wav")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument(
        "--srtp", action="store_true", help="SRTP media (SDES, AES_CM_128_HMAC_SHA1_80)"
    )
    tc.add_profile_option(parser)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    counts = [int(c) for c in args.calls.split(",") if c.strip()]
    available = os.sched_getaffinity(0)
    gw_cores = {args.gateway_core}
    load_cores = (available - gw_cores) or available
    tc.raise_nofile()
    os.sched_setaffinity(0, load_cores)
    results = []
    for n in counts:
        print(f"siprec N={n}: loadavg before {tc.loadavg()} ...", file=sys.stderr, flush=True)
        try:
            r = run_one(n, args, gw_cores, load_cores)
        except (RuntimeError, OSError) as exc:
            print(f"  N={n} failed: {exc}", file=sys.stderr, flush=True)
            results.append({"ingress": "siprec", "calls": n, "failed": str(exc)})
            continue
        r["problems"] = verdict(r)
        results.append(r)
        print(
            f"  gateway {r['gateway_cpu_percent_of_core']}% of a core, "
            f"{r['memory_per_call_kib']} KiB/call, {r['frames_per_call_s']} packets/call/s, "
            f"packet-to-clock p50/p99 {r['packet_to_clock_ms_p50']}/"
            f"{r['packet_to_clock_ms_p99']} ms"
            + (f"; PROBLEMS: {'; '.join(r['problems'])}" if r["problems"] else ""),
            file=sys.stderr,
            flush=True,
        )
    report = {"cpu_count": os.cpu_count(), "python": sys.version.split()[0], "results": results}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    print(table([r for r in results if "failed" not in r]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
