"""`gateway serve` logs: JSON lines with no transcript text and no phone numbers at info level.

A real `gateway serve` process (logs at info, JSON because stderr is a pipe) transcribes one
simulated Twilio call through `gateway stt-server --engine scripted`, whose words are known. The
call's <Parameter>s carry phone numbers, as a TwiML app passing From/To along would. After the
call and a SIGTERM, nothing the gateway printed may contain a transcript word or a phone number,
every log line is JSON, and the call is summarised by exactly one start and one end line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.gateway_server import TOKEN, call_messages, send_messages

ROOT = Path(__file__).resolve().parent.parent
CALL_SID = "CA5f0c1e2d3b4a59687766554433221100"

# Distinctive words: none of them can turn up in a log line by coincidence.
SCRIPT = [
    [["refinance", 100, 500], ["Albuquerque", 600, 1100]],
    [["marmalade", 1500, 1900], ["zeppelin", 2000, 2400]],
]

# The same numbers in the formats callers and TwiML apps pass them in.
PHONES = {
    "From": "+14155550123",
    "To": "+1 (212) 555-0187",
    "caller": "628.555.0142",
    "callback": "4155550199",
}

# Words that log lines carry as event names, keys or reasons; a transcript word among them is not
# evidence of a leak.
LOG_VOCABULARY = frozenset(
    {
        "call",
        "started",
        "ended",
        "stop",
        "stored",
        "transcript",
        "final",
        "turn",
        "turns",
        "finals",
        "words",
        "channel",
        "channels",
        "source",
        "twilio",
        "engine",
        "level",
        "event",
        "info",
        "warning",
        "error",
        "debug",
        "reason",
        "duration",
        "roles",
        "role",
        "customer",
        "agent",
        "path",
        "stream",
        "gateway",
        "draining",
        "ending",
        "calls",
        "active",
        "timeout",
        "utterances",
        "filled",
        "late",
        "audio",
        "frames",
        "session",
        "begin",
        "close",
        "normal",
        "shutdown",
    }
)


def _phone_pattern(number: str) -> re.Pattern[str]:
    """The national number's digits with any separators between them (+1, spaces, dots, ...)."""
    digits = re.sub(r"\D", "", number)[-10:]
    return re.compile(r"[\s().+-]*".join(digits))


async def _read_all(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode(errors="replace").rstrip("\n"))


async def _ended_transcript(http: str, call_sid: str, within_s: float) -> dict[str, Any]:
    """The call's transcript from the REST API (loopback needs no token) once the call ended."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(within_s / 0.1)):
            async with session.get(f"{http}/v1/calls/{call_sid}/transcript") as resp:
                if resp.status == 200:
                    doc: dict[str, Any] = await resp.json()
                    if doc["state"] == "ended":
                        return doc
            await asyncio.sleep(0.1)
    raise TimeoutError(f"call {call_sid} not ended within {within_s} s")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


async def _start(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_serve_logs_no_transcript_text_and_no_phone_numbers(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    data_dir = tmp_path / "data"

    stt = await _start(
        ["stt-server", "--port", "0", "--engine", "scripted", "--script", str(script)],
        _env(GATEWAY_LOGGING__LEVEL="warning"),
    )
    serve: asyncio.subprocess.Process | None = None
    out: list[str] = []
    err: list[str] = []
    readers: list[asyncio.Task[None]] = []
    try:
        assert stt.stdout is not None and stt.stderr is not None
        async with asyncio.timeout(60):
            banner = (await stt.stdout.readline()).decode()
        assert banner.startswith("stt-server listening on ws://127.0.0.1:"), banner
        stt_url = banner.strip().rsplit(" ", 1)[-1]
        readers.append(asyncio.create_task(_read_all(stt.stderr, [])))

        config = tmp_path / "gateway.toml"
        config.write_text(
            "\n".join(
                [
                    "[stt]",
                    'engine = "assemblyai"',
                    "[stt.assemblyai]",
                    f'url = "{stt_url}"',
                    "[server]",
                    f"data_dir = {json.dumps(str(data_dir))}",
                    "drain_timeout_s = 20.0",
                    "[twilio]",
                    "redirect_grace_s = 0.0",
                    "[logging]",
                    'level = "info"',
                    "",
                ]
            )
        )
        serve = await _start(
            ["--config", str(config), "serve", "--host", "127.0.0.1", "--port", "0"],
            _env(GATEWAY_TWILIO__AUTH_TOKEN=TOKEN),
        )
        assert serve.stdout is not None and serve.stderr is not None
        readers.append(asyncio.create_task(_read_all(serve.stderr, err)))
        async with asyncio.timeout(120):
            first = (await serve.stdout.readline()).decode()
        out.append(first.rstrip("\n"))
        match = re.match(r"callgate \S+ serving on 127\.0\.0\.1:(\d+)", first)
        assert match, (first, err)
        readers.append(asyncio.create_task(_read_all(serve.stdout, out)))
        http = f"http://127.0.0.1:{match.group(1)}"
        url = f"ws://127.0.0.1:{match.group(1)}/twilio/stream"

        closed = await send_messages(url, call_messages(CALL_SID, 4.0, params=dict(PHONES)))
        assert (closed.code, closed.reason) == (1000, "stop")
        doc = await _ended_transcript(http, CALL_SID, 60)

        serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await serve.wait() == 0, err
            await asyncio.gather(*readers[1:])
    finally:
        for proc in (serve, stt):
            if proc is not None:
                await _stop(proc)
        for task in readers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert doc["source_ids"]["callSid"] == CALL_SID
    # The numbers reached the gateway (the call's metadata keeps them; logs must not).
    assert doc["metadata"]["param.From"] == PHONES["From"], doc["metadata"]
    call_id = doc["call_id"]
    words = {
        w.lower()
        for u in doc["utterances"]
        for w in re.findall(r"[A-Za-z]+", u["text"])
        if len(w) >= 4 and w.lower() not in LOG_VOCABULARY
    }
    # The call was transcribed, so there is something that must not leak.
    assert {"refinance", "albuquerque", "marmalade", "zeppelin"} <= words, doc["utterances"]

    printed = "\n".join(out + err)
    leaked_words = sorted(w for w in words if re.search(rf"\b{w}\b", printed, re.IGNORECASE))
    leaked_phones = sorted(
        f"{key}={number}"
        for key, number in PHONES.items()
        if _phone_pattern(number).search(printed)
    )
    leaks = [
        line
        for line in out + err
        if any(re.search(rf"\b{w}\b", line, re.IGNORECASE) for w in words)
        or any(_phone_pattern(n).search(line) for n in PHONES.values())
    ]
    assert not leaked_words and not leaked_phones, (
        f"transcript words {leaked_words} / phone numbers {leaked_phones} in the output:\n"
        + "\n".join(leaks)
    )

    # stdout is the banner (what serves where); every line on stderr is a JSON log record.
    assert out and all(not line.startswith("{") for line in out), out
    records: list[dict[str, Any]] = []
    not_json: list[str] = []
    for line in err:
        try:
            record = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if not isinstance(record, dict) or "event" not in record or "level" not in record:
            not_json.append(line)
            continue
        records.append(record)
    assert not not_json, "stderr lines that are not JSON log records:\n" + "\n".join(not_json)

    starts = [r for r in records if r["event"] == "call.started"]
    ends = [r for r in records if r["event"] == "call.ended"]
    assert len(starts) == 1, starts
    assert len(ends) == 1, ends
    assert starts[0].get("call_id") == call_id, starts[0]
    assert starts[0]["level"] == "info"
    end = ends[0]
    assert end.get("call_id") == call_id, end
    assert end["level"] == "info"
    assert "duration_s" in end or "duration_ms" in end, f"call.ended has no duration: {end}"
    duration_s = end["duration_s"] if "duration_s" in end else end["duration_ms"] / 1000
    assert 3.9 <= duration_s <= 4.1, end
    assert "turns" in end or "finals" in end, f"call.ended has no turn count: {end}"
