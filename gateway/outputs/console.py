"""ConsoleTranscript: a live call transcript on a terminal (the ``gateway serve --demo`` view).

Finals are printed as lines in audio order (the merger's ordered stream), each with its call
time and speaker. On a terminal, the partials of every channel share one status line below them
that is rewritten in place; elsewhere (a pipe, a log file) only the final lines are written.
Transcript text is personal data: this is for demos and local use, never a production log.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from gateway.calls.call import Call, CallOutput, CallState, CallStateChanged
from gateway.transcript.merger import TurnDelta, UtteranceReleased

_CLEAR = "\r\x1b[K"


def _stamp(ms: int) -> str:
    seconds, tenth = divmod(max(ms, 0) // 100, 10)
    minutes, second = divmod(seconds, 60)
    return f"{minutes:02d}:{second:02d}.{tenth}"


class ConsoleTranscript:
    """A call listener (``call.add_listener``) writing to ``stream``."""

    def __init__(self, stream: TextIO, *, live: bool | None = None) -> None:
        self._out = stream
        self._live = stream.isatty() if live is None else live
        self._partials: dict[tuple[str, int], str] = {}
        self._status_shown = False
        self._calls: dict[str, int] = {}

    def __call__(self, call: Call, output: CallOutput) -> None:
        if isinstance(output, TurnDelta):
            u = output.update
            key = (call.call_id, u.channel)
            if u.final or not u.text.strip():
                self._partials.pop(key, None)
            else:
                label = self._label(call, u.channel)
                self._partials[key] = f"{label}: {u.text.strip()}"
            self._redraw()
        elif isinstance(output, UtteranceReleased):
            utt = output.utterance
            prefix = self._prefix(call)
            self._line(f"{prefix}[{_stamp(utt.start)}] {utt.speaker}: {utt.text}")
        elif isinstance(output, CallStateChanged):
            if output.state is CallState.ACTIVE:
                self._calls.setdefault(call.call_id, len(self._calls) + 1)
                ids = ", ".join(f"{k}={v}" for k, v in call.source_ids.items() if "Sid" in k)
                self._line(
                    f"-- call {call.call_id} started ({call.source}{', ' + ids if ids else ''})"
                )
            elif output.state in (CallState.ENDED, CallState.FAILED):
                for key in [k for k in self._partials if k[0] == call.call_id]:
                    del self._partials[key]
                self._line(
                    f"-- call {call.call_id} {output.state.value}"
                    f"{' (' + output.reason + ')' if output.reason else ''}"
                )

    def _prefix(self, call: Call) -> str:
        return f"#{self._calls[call.call_id]} " if len(self._calls) > 1 else ""

    @staticmethod
    def _label(call: Call, channel: int) -> str:
        ch = call.channels.get(channel)
        if ch is None:
            return f"channel{channel}"
        return ch.spec.participant or ch.spec.role

    def _line(self, text: str) -> None:
        if self._live and self._status_shown:
            self._out.write(_CLEAR)
            self._status_shown = False
        self._out.write(text + "\n")
        self._redraw()

    def _redraw(self) -> None:
        if not self._live:
            self._out.flush()
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        status = "  |  ".join(self._partials.values())
        if status:
            status = "… " + status
            if len(status) > width:
                status = "…" + status[-(width - 1) :]
        self._out.write(_CLEAR + status)
        self._status_shown = bool(status)
        self._out.flush()
