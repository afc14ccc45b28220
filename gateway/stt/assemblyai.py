"""AssemblyAI Universal Streaming v3 client: one lossless :class:`SttSession` per channel.

Contract (DESIGN.md invariants 2 and 3):

* Audio is kept from the end of the channel's last final turn. When a connection fails in a
  retryable way (1006, 1011, 3005, a stall caught by pings, malformed frames, a session that never
  sent ``Begin``, 3009/concurrency after a backoff) the client opens a new session (a new *epoch*)
  and replays the kept audio; the new session's offset is the call time of the first replayed
  sample, so its word times land on the call clock. Finals that end at or before the last final
  already emitted are suppressed, so every word is delivered exactly once.
* 1008 (auth/account) fails the channel at once with a clear :class:`SttError`; 3006/3007/1009 are
  bugs on our side: the channel fails loudly, no retry loop.
* Sessions roll over before ``Begin.expires_at`` at a turn boundary (3008 is handled like a
  reconnect if it still happens).
* Audio is re-chunked to ``chunk_ms`` (50-1000 ms), the last chunk padded to at least 50 ms, and
  never sent faster than real time within a session. µ-law goes as-is (``pcm_mulaw``).
* :meth:`finish` sends ``Terminate`` and drains until ``Termination`` (bounded) on every path.

The wire format lives in :mod:`gateway.stt.v3_protocol`; this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import Enum

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from gateway.config import AssemblyAISettings
from gateway.media import codec as codecs
from gateway.media.codec import Codec, silence
from gateway.observability.logging import get_logger
from gateway.stt.chunker import AudioChunker, Pacer
from gateway.stt.session import EngineStats, SessionParams, SttError, SttEvent, Watermark
from gateway.stt.v3_protocol import (
    Begin,
    CloseAction,
    ErrorMessage,
    FinalTurn,
    PartialTurn,
    ProtocolError,
    StreamingParams,
    Terminate,
    Termination,
    Turn,
    TurnTracker,
    classify_close,
    encode_client_message,
    parse_server_message,
)
from gateway.transcript.model import TurnUpdate, Word

log = get_logger("gateway.stt.assemblyai")

# A connection that lasted this long counts as working even without a final (a silent leg):
# the retry count starts over after it.
_STABLE_S = 30.0
# Audio sent this recently may hold the start of a turn the service has not reported yet: kept
# for a replay even with no turn open (s).
_UNREPORTED_S = 5.0


class _Outcome(Enum):
    DONE = "done"  # Terminate answered: the session is complete
    RETRY = "retry"  # reconnect (with backoff) and replay
    ROLLOVER = "rollover"  # planned new session: replay at once
    FAILED = "failed"  # give up on this channel


@dataclass(slots=True)
class _ConnectionResult:
    outcome: _Outcome
    reason: str
    began: bool = False  # the session reached Begin
    backoff_floor: float = 0.0
    planned: bool = False  # a rollover we asked for (Terminate near expiry)
    kind: str = "other"  # a bounded token for metric labels (close_1006, connect_failed, ...)


# Close codes that get their own metric label; anything else a server sends is "close_other".
_LABELLED_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 3005, 3006, 3007, 3008, 3009}
)


def _close_kind(code: int | None) -> str:
    if code is None:
        return "connection_lost"
    return f"close_{code}" if code in _LABELLED_CODES else "close_other"


class AssemblyAIEngine:
    """Sessions to AssemblyAI (or any v3-compatible server) with the configured parameters."""

    name = "assemblyai"

    def __init__(self, settings: AssemblyAISettings) -> None:
        self.settings = settings
        self.sessions: set[AssemblyAISession] = set()
        self.stats = EngineStats()
        # Called per chunk with the seconds from the arrival (send()) of its first and of its
        # last sample to the chunk leaving on the socket; first transmissions only.
        self.on_chunk_sent: Callable[[float, float], None] | None = None

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for session in list(self.sessions):
            await session.aclose()

    @property
    def reconnects(self) -> int:
        """Reconnects of every session so far (planned rollovers included)."""
        return self.stats.reconnects.total()

    @property
    def failures(self) -> int:
        """Sessions that failed for good."""
        return self.stats.failures.total()

    def open_session(self, params: SessionParams) -> AssemblyAISession:
        session = AssemblyAISession(self, params)
        self.sessions.add(session)
        self.stats.session_starts += 1
        return session


class AssemblyAISession:
    """One channel's v3 streaming session, reconnecting and replaying as needed."""

    def __init__(self, engine: AssemblyAIEngine, params: SessionParams) -> None:
        self.params = params
        self.settings = s = engine.settings
        self._engine = engine
        # µ-law goes as-is; everything else (L16, A-law) as 16-bit PCM, the other v3 encoding.
        self._wire = Codec.PCMU if params.codec is Codec.PCMU else Codec.L16
        self._width = self._wire.sample_width
        self._silence = silence(self._wire, 1)
        encoding = "pcm_mulaw" if self._wire is Codec.PCMU else "pcm_s16le"
        overrides = {k: v for k, v in params.options.items() if k in _QUERY_KEYS}
        self._query = replace(
            StreamingParams(
                speech_model=s.speech_model,
                sample_rate=params.sample_rate,
                encoding=encoding,
                format_turns=s.format_turns,
                end_of_turn_confidence_threshold=s.end_of_turn_confidence_threshold,
                min_turn_silence=s.min_turn_silence,
                max_turn_silence=s.max_turn_silence,
                keyterms_prompt=tuple(s.keyterms_prompt) or None,
                speaker_labels=s.speaker_labels,
                max_speakers=s.max_speakers,
                inactivity_timeout=s.inactivity_timeout,
            ),
            **overrides,  # type: ignore[arg-type]
        )
        # Per-call override: an offline file is paced strictly (0), live audio may catch up.
        lead = params.options.get("max_catchup_ms", s.max_catchup_ms)
        self._lead_ms = int(lead) if isinstance(lead, int | float) else s.max_catchup_ms
        # Audio kept for replay: samples [kept_start, received) of this channel.
        self._kept = bytearray()
        self._kept_start = 0
        self._received = 0
        self._on_socket = 0  # sample index up to which audio has left on a socket
        self.reconnects = 0
        self.finals_seen = 0  # finals delivered (a connection that made any made progress)
        self._more = asyncio.Event()
        self._wake_at = 0  # sample index at which the sender has a whole chunk to send
        # The connection whose sender task waits, caught up, for the next chunk: send() may
        # send for it (None while the task is busy, pacing, rolling over or finishing).
        self._parked: _Conn | None = None
        self._finishing = False
        self._last_final_end_ms = -1
        self._epoch = 0
        self._watermark = -1
        self._open_partial: TurnUpdate | None = None
        self._arrivals: deque[tuple[int, int, float]] = deque()  # (start, end, arrival time)
        self._output: asyncio.Queue[SttEvent | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"stt-aai-ch{params.channel}")
        self._log = log.bind(call_id=params.call_id or None, channel=params.channel)

    # -- SttSession -----------------------------------------------------------------------------

    @property
    def queued_ms(self) -> int:
        return self._ms(max(0, self._received - self._on_socket))

    async def send(self, audio: bytes) -> None:
        if self._finishing:
            raise RuntimeError("send() after finish()")
        if self._task.done():
            return  # the channel failed; its SttError is already in the event stream
        if self.params.codec is not self._wire:
            audio = codecs.decode(self.params.codec, audio)
        self._kept.extend(audio)
        start = self._received
        self._received += len(audio) // self._width
        if self._engine.on_chunk_sent is not None:
            self._arrivals.append((start, self._received, time.monotonic()))
        if self._received >= self._wake_at:
            # A whole chunk is ready (not on every frame): a caught-up connection sends it right
            # here; otherwise the sender task decides.
            conn = self._parked
            if conn is None or not conn.send_now():
                self._more.set()

    async def finish(self) -> None:
        self._finishing = True
        self._more.set()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.cancelled():
                raise  # our caller was cancelled (a timeout, shutdown): not the session

    async def events(self) -> AsyncIterator[SttEvent]:
        while (event := await self._output.get()) is not None:
            yield event

    async def aclose(self) -> None:
        self._finishing = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # -- connection management ------------------------------------------------------------------

    def _ms(self, samples: int) -> int:
        return samples * 1000 // self.params.sample_rate

    async def _run(self) -> None:
        s = self.settings
        attempt = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                finals, opened_at = self.finals_seen, loop.time()
                result = await self._connect_once()
                if result.outcome is _Outcome.DONE:
                    return
                # Progress: the session finalized something or held up a while. Only then do
                # retries start over; a session that dies every time after Begin (or expires
                # before it) would otherwise reconnect forever.
                progressed = result.began and (
                    self.finals_seen > finals or loop.time() - opened_at >= _STABLE_S
                )
                stats = self._engine.stats
                if result.outcome is _Outcome.FAILED:
                    self._close_open_partial()
                    stats.failures[result.kind] += 1
                    self._log.error("stt.failed", reason=result.reason, epoch=self._epoch)
                    self._output.put_nowait(SttError(self.params.channel, result.reason, True))
                    return
                self._close_open_partial()
                stats.reconnects[
                    "rollover" if result.outcome is _Outcome.ROLLOVER else result.kind
                ] += 1
                self.reconnects += 1
                self._epoch += 1
                if result.outcome is _Outcome.ROLLOVER and (result.planned or progressed):
                    attempt = 0
                    continue  # a fresh session at once, replaying from the last final
                attempt = 1 if progressed else attempt + 1
                if attempt > s.max_retries:
                    reason = f"gave up after {s.max_retries} retries: {result.reason}"
                    self._output.put_nowait(SttError(self.params.channel, reason, True))
                    stats.failures["retries_exhausted"] += 1
                    return
                delay = min(s.backoff_max_s, s.backoff_initial_s * 2 ** (attempt - 1))
                delay = max(delay * random.uniform(0.5, 1.0), result.backoff_floor)
                self._log.warning(
                    "stt.reconnect", reason=result.reason, attempt=attempt, delay_s=round(delay, 2)
                )
                self._output.put_nowait(SttError(self.params.channel, result.reason, False))
                await asyncio.sleep(delay)
        finally:
            self._engine.sessions.discard(self)
            self._output.put_nowait(Watermark(self.params.channel, 2**62))
            self._output.put_nowait(None)

    async def _connect_once(self) -> _ConnectionResult:
        s = self.settings
        headers = {}
        key = s.token.get_secret_value() or s.api_key.get_secret_value()
        if key:
            headers["Authorization"] = key
        url = f"{s.endpoint}?{self._query.to_query()}"
        try:
            ws = await asyncio.wait_for(
                websockets.connect(
                    url,
                    additional_headers=headers,
                    ping_interval=s.ping_interval_s,
                    ping_timeout=s.ping_timeout_s,
                    max_size=None,
                    open_timeout=s.connect_timeout_s,
                    # Audio does not compress: permessage-deflate would only burn CPU per chunk.
                    compression=None,
                ),
                s.connect_timeout_s + 1,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            text = f"handshake rejected (HTTP {status})"
            if status in (401, 403):
                return _ConnectionResult(_Outcome.FAILED, text, kind="unauthorized")
            return _ConnectionResult(_Outcome.RETRY, text, kind="handshake_rejected")
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return _ConnectionResult(
                _Outcome.RETRY, f"connect failed: {exc!r}", kind="connect_failed"
            )
        try:
            return await self._converse(ws)
        finally:
            # Billing runs until the session ends: on every exit path not already answered by
            # Termination (errors, cancellation), tell the service, best effort and bounded.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(ws.send(encode_client_message(Terminate())), 1)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(ws.close(), 2)

    async def _converse(self, ws: ClientConnection) -> _ConnectionResult:
        s = self.settings
        try:
            first = await asyncio.wait_for(ws.recv(), s.begin_timeout_s)
        except TimeoutError:
            return _ConnectionResult(_Outcome.RETRY, "no Begin within the timeout", kind="no_begin")
        except ConnectionClosed as exc:
            return self._closed(exc, began=False)
        try:
            begin = parse_server_message(first if isinstance(first, str) else first.decode())
        except ProtocolError as exc:
            return _ConnectionResult(
                _Outcome.RETRY, f"malformed message before Begin: {exc}", kind="malformed"
            )
        if not isinstance(begin, Begin):
            if isinstance(begin, ErrorMessage):
                return self._error_result(begin.error_code, begin.error, began=False)
            return _ConnectionResult(
                _Outcome.RETRY, f"expected Begin, got {type(begin).__name__}", kind="malformed"
            )
        self._log.info("stt.begin", session_id=begin.id, epoch=self._epoch)
        conn = _Conn(self, ws, begin)
        sender = asyncio.create_task(conn.send_loop())
        try:
            result = await conn.receive_loop()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        return result

    def _closed(self, exc: ConnectionClosed, *, began: bool) -> _ConnectionResult:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
        return self._error_result(code, reason, began=began)

    def _error_result(self, code: int | None, reason: str, *, began: bool) -> _ConnectionResult:
        action = classify_close(code, reason)
        text = f"{code}: {reason}" if code is not None else reason
        kind = _close_kind(code)
        if action is CloseAction.CLEAN:
            return _ConnectionResult(
                _Outcome.RETRY, f"closed before Termination ({text})", began, kind=kind
            )
        if action is CloseAction.FAIL:
            return _ConnectionResult(
                _Outcome.FAILED, f"AssemblyAI refused the session ({text})", kind=kind
            )
        if action is CloseAction.BUG:
            return _ConnectionResult(
                _Outcome.FAILED, f"protocol violation on our side ({text})", kind=kind
            )
        if action is CloseAction.ROLLOVER:
            return _ConnectionResult(_Outcome.ROLLOVER, f"session expired ({text})", began)
        if action is CloseAction.BACKOFF:
            floor = self.settings.backoff_initial_s * 4
            return _ConnectionResult(
                _Outcome.RETRY, f"rate limited ({text})", False, floor, kind=kind
            )
        return _ConnectionResult(_Outcome.RETRY, text, began, kind=kind)

    # -- turns ----------------------------------------------------------------------------------

    def _on_final(self, turn: Turn, offset_ms: int) -> None:
        update = self._update(turn, offset_ms, final=True)
        if update is None:
            # An empty end of turn (the engine dropped what it had heard): the turn's partial
            # must not stay open, so it is closed with an empty final.
            p = self._open_partial
            if p is not None and p.epoch == self._epoch and p.turn_order == turn.turn_order:
                self._close_open_partial()
            return
        if update.end_ms <= self._last_final_end_ms:
            return  # replayed audio re-finalized a turn we already delivered
        self._last_final_end_ms = update.end_ms
        self.finals_seen += 1
        if self._open_partial is not None and self._open_partial.key == update.key:
            self._open_partial = None
        self._output.put_nowait(update)
        # Audio before the end of this final will never be needed again.
        end_samples = (update.end_ms - self.params.offset_ms) * self.params.sample_rate // 1000
        drop = min(end_samples, self._received) - self._kept_start
        if drop > 0:
            del self._kept[: drop * self._width]
            self._kept_start += drop

    def _forget_heard(self, open_turn_start_ms: int | None, sent: int) -> None:
        """Stop keeping audio the service has heard with no turn in it: a replay needs only the
        last ``_UNREPORTED_S`` before ``sent`` (a turn may have begun there, not reported yet)
        and everything from the start of an open turn. Finals trim the rest (``_on_final``).

        Without this, a long stretch with no turn (a muted leg, a hold) grew the replay buffer by
        16 KB a second at 8 kHz, and a reconnect replayed all of it at real time, leaving the
        channel that far behind the call."""
        rate = self.params.sample_rate
        keep_from = sent - int(_UNREPORTED_S * rate)
        if open_turn_start_ms is not None:
            keep_from = min(keep_from, (open_turn_start_ms - self.params.offset_ms) * rate // 1000)
        drop = keep_from - self._kept_start
        if drop >= rate:  # a second at a time
            del self._kept[: drop * self._width]
            self._kept_start += drop

    def _on_partial(self, turn: Turn, offset_ms: int) -> None:
        update = self._update(turn, offset_ms, final=False)
        if update is not None and update.end_ms > self._last_final_end_ms:
            self._open_partial = update
            self._output.put_nowait(update)

    def _close_open_partial(self) -> None:
        """The connection died mid-turn: close its partial with an empty final (the replay
        delivers the words again under the new epoch)."""
        p = self._open_partial
        if p is not None:
            self._open_partial = None
            self._output.put_nowait(replace(p, words=(), text="", final=True))

    def _update(self, turn: Turn, offset_ms: int, *, final: bool) -> TurnUpdate | None:
        base = self.params.offset_ms + offset_ms
        words = tuple(
            Word(w.text, base + int(w.start), base + int(w.end), float(w.confidence))
            for w in turn.words
        )
        if not words and not turn.transcript:
            return None
        start = words[0].start if words else base
        end = max(w.end for w in words) if words else base
        confidence = sum(w.confidence for w in words) / len(words) if words else 0.0
        return TurnUpdate(
            channel=self.params.channel,
            epoch=self._epoch,
            turn_order=turn.turn_order,
            words=words,
            text=turn.transcript or " ".join(w.text for w in words),
            start_ms=start,
            end_ms=end,
            final=final,
            confidence=round(confidence, 4),
            speaker=turn.speaker_label,
        )

    def _measure(self, first: int, sent: int) -> None:
        """Report the chunk of samples ``[first, sent)`` to the engine's send-delay hook."""
        hook = self._engine.on_chunk_sent
        arrivals = self._arrivals
        if hook is None or not arrivals:
            return
        while arrivals and arrivals[0][1] <= first:
            arrivals.popleft()  # frames of earlier chunks (or of a replay)
        if not arrivals or arrivals[0][0] > first:
            return
        opened = arrivals[0][2]  # the frame holding the chunk's first sample
        while arrivals and arrivals[0][1] < sent:
            arrivals.popleft()
        if arrivals and arrivals[0][0] < sent:
            _, end, closed = arrivals[0]  # the frame holding the chunk's last sample
            if end == sent:
                arrivals.popleft()
            now = time.monotonic()
            hook(now - opened, now - closed)

    def _emit_watermark(self, open_turn_start: int | None, sent_samples: int) -> None:
        mark = self.params.offset_ms + self._ms(sent_samples) - self.settings.watermark_lag_ms
        if open_turn_start is not None:
            mark = min(mark, open_turn_start)
        # Every 250 ms at most while audio flows: each event wakes the call's reader task.
        if mark >= self._watermark + 250 or (
            mark > self._watermark and open_turn_start is not None
        ):
            self._watermark = mark
            self._output.put_nowait(Watermark(self.params.channel, mark))


_QUERY_KEYS = frozenset(
    {
        "speech_model",
        "format_turns",
        "end_of_turn_confidence_threshold",
        "min_turn_silence",
        "max_turn_silence",
        "keyterms_prompt",
        "speaker_labels",
        "max_speakers",
        "inactivity_timeout",
    }
)


class _Conn:
    """One WebSocket connection (one epoch) of a session: a sender and a receiver."""

    def __init__(self, session: AssemblyAISession, ws: ClientConnection, begin: Begin) -> None:
        self.s = session
        self.ws = ws
        self.begin = begin
        self.offset = session._kept_start  # samples: the first sample this session is sent
        self.offset_ms = session._ms(self.offset)
        self.sent = self.offset  # samples sent on this connection (absolute index)
        self.queued = self.offset  # absolute sample index fed to the chunker so far
        self.audio_ms = 0.0  # audio sent on this connection, for the pacer
        settings = session.settings
        self.chunker = AudioChunker(
            session.params.sample_rate,
            session._width,
            chunk_ms=settings.chunk_ms,
            silence_byte=session._silence,
        )
        # Never faster than real time, measured as the service does: audio received by this
        # session against its wall time. A lead of max_catchup_ms absorbs the backlog of
        # connecting or replaying and the jitter of live frames; beyond it, pace.
        self.pacer = Pacer(time.monotonic(), lead_ms=session._lead_ms)
        self.tracker = TurnTracker(settings.format_turns)
        self.open_turn_start: int | None = None
        self.terminated = asyncio.Event()
        self.rollover = False
        self.finals = 0

    async def send_loop(self) -> None:
        s = self.s
        s._more.set()  # a new connection starts by replaying what is kept
        try:
            while True:
                # Park only once audio has flowed: the first chunk resets the pacer.
                s._parked = self if self.audio_ms else None
                await s._more.wait()
                s._parked = None
                s._more.clear()
                while True:
                    for chunk in self._take():
                        if self._expiring():
                            # A turn boundary close to expiry: hand over to a fresh session,
                            # which replays everything after the last final (this chunk too).
                            await self._roll_over()
                            return
                        if self.audio_ms == 0:
                            # The service's real-time check starts at the first audio: time
                            # spent connected without any is no credit to send faster.
                            self.pacer.reset(time.monotonic())
                        self.audio_ms += self.chunker.ms_of(len(chunk))
                        delay = self.pacer.due(self.audio_ms) - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await self.ws.send(chunk)
                        self._sent(chunk)
                    if self.queued >= s._received:
                        if s._finishing and self.chunker.pending_bytes:
                            continue  # finish() came while sending: the partial tail goes too
                        self._rearm()
                        break
                if s._finishing and self.queued >= s._received:
                    await self.ws.send(encode_client_message(Terminate()))
                    self.terminated.set()
                    return
                if self._expiring():
                    await self._roll_over()
                    return
        finally:
            if s._parked is self:
                s._parked = None

    def send_now(self) -> bool:
        """Send the whole chunks waiting, here and now, for the parked sender task: the steady
        state of a live channel, without a task switch and a send context per chunk.

        Returns False, having changed nothing, whenever the task must decide instead: finishing,
        close to expiry, a chunk not yet due by the pacer, a socket closing or with unsent data
        (flow control: the task's ``send`` waits for it to drain). Frames go through the
        connection's sans-I/O protocol, as ``send`` would put them.
        """
        s = self.s
        ws = self.ws
        transport = ws.transport
        protocol = ws.protocol
        if (
            s._finishing
            or protocol.state is not State.OPEN
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or self._expiring()
        ):
            return False
        chunker = self.chunker
        waiting = chunker.pending_bytes + (s._received - max(self.queued, s._kept_start)) * s._width
        count = waiting // chunker.chunk_bytes
        last_start_ms = self.audio_ms + (count - 1) * chunker.ms_of(chunker.chunk_bytes)
        if count and self.pacer.earliest(last_start_ms) > time.monotonic():
            return False
        for chunk in self._take():
            self.audio_ms += chunker.ms_of(len(chunk))
            self.pacer.due(self.audio_ms)  # on time (checked above); keeps the pacer's count
            protocol.send_binary(chunk)
            for data in protocol.data_to_send():
                transport.write(data)
            self._sent(chunk)
        self._rearm()
        return True

    def _take(self) -> list[bytes]:
        """The whole chunks of the audio received since the last call (finishing: the tail
        too, padded), from the replay buffer; ``queued`` moves past it."""
        s = self.s
        queued = max(self.queued, s._kept_start)
        data = s._kept[(queued - s._kept_start) * s._width :]
        self.queued = queued + len(data) // s._width
        chunks = self.chunker.push(data) if data else []
        if s._finishing and self.queued >= s._received:
            tail = self.chunker.flush()
            if tail is not None:
                chunks.append(tail)
        return chunks

    def _sent(self, chunk: bytes) -> None:
        """``chunk`` is on the socket: account for it, report its delay, let go of heard audio."""
        s = self.s
        first = self.sent
        self.sent += len(chunk) // s._width
        s._on_socket = max(s._on_socket, self.sent)
        s._emit_watermark(self.open_turn_start, min(self.sent, s._received))
        s._measure(first, self.sent)
        s._forget_heard(self.open_turn_start, self.sent)

    def _rearm(self) -> None:
        """Wake the sender (or send now) when the next whole chunk has arrived."""
        s = self.s
        pending = self.chunker.pending_bytes // s._width
        s._wake_at = self.queued - pending + self.chunker.chunk_samples

    async def _roll_over(self) -> None:
        self.rollover = True
        await self.ws.send(encode_client_message(Terminate()))
        self.terminated.set()

    def _expiring(self) -> bool:
        """Close to expiry, at a turn boundary, after this session finalized something.

        The last condition guarantees progress: a fresh session replays from the last final, so
        rolling over before any final would replay the same audio forever when the margin is
        close to the session lifetime. A session that hears only silence expires (3008) and is
        replaced like after a drop, losing nothing.
        """
        margin = self.s.settings.rollover_margin_s
        return (
            self.finals > 0
            and self.open_turn_start is None
            and time.time() >= self.begin.expires_at - margin
        )

    async def receive_loop(self) -> _ConnectionResult:
        s = self.s
        try:
            while True:
                timeout = None
                if self.terminated.is_set():
                    timeout = s.settings.terminate_timeout_s
                try:
                    raw = await asyncio.wait_for(self.ws.recv(), timeout)
                except TimeoutError:
                    return self._drained("no Termination within the timeout", "no_termination")
                try:
                    message = parse_server_message(raw if isinstance(raw, str) else raw.decode())
                except ProtocolError as exc:
                    return _ConnectionResult(
                        _Outcome.RETRY, f"malformed message: {exc}", True, kind="malformed"
                    )
                if isinstance(message, Turn):
                    for event in self.tracker.feed(message):
                        if isinstance(event, FinalTurn):
                            self.open_turn_start = None
                            self.finals += 1
                            s._on_final(event.turn, self.offset_ms)
                        elif isinstance(event, PartialTurn):
                            if event.turn.words:
                                start = (
                                    s.params.offset_ms + self.offset_ms + event.turn.words[0].start
                                )
                                self.open_turn_start = start
                            s._on_partial(event.turn, self.offset_ms)
                    s._emit_watermark(self.open_turn_start, min(self.sent, s._received))
                elif isinstance(message, Termination):
                    for event in self.tracker.flush():
                        s._on_final(event.turn, self.offset_ms)
                    if self.rollover:
                        return _ConnectionResult(
                            _Outcome.ROLLOVER, "planned rollover", True, planned=True
                        )
                    if self.terminated.is_set():
                        return _ConnectionResult(_Outcome.DONE, "terminated", True)
                    # Not asked for (the session expired, or the service ended it): the audio
                    # after the last final still needs a session.
                    return _ConnectionResult(
                        _Outcome.ROLLOVER, "terminated by the service", True, kind="terminated"
                    )
                elif isinstance(message, ErrorMessage):
                    s._log.warning("stt.error_frame", code=message.error_code, error=message.error)
        except ConnectionClosed as exc:
            for event in self.tracker.flush():
                s._on_final(event.turn, self.offset_ms)
            return s._closed(exc, began=True)

    def _drained(self, reason: str, kind: str) -> _ConnectionResult:
        for event in self.tracker.flush():
            self.s._on_final(event.turn, self.offset_ms)
        if self.rollover:
            return _ConnectionResult(_Outcome.ROLLOVER, reason, True, planned=True)
        # Finishing without a Termination: the audio after the last final was not confirmed.
        # Retry so the tail is transcribed by a fresh session.
        return _ConnectionResult(_Outcome.RETRY, reason, True, kind=kind)
