"""ConsoleTranscript: partials rewrite one status line in place, finals print as lines."""

from __future__ import annotations

import io

from gateway.calls.call import Call, CallState, CallStateChanged
from gateway.outputs.console import ConsoleTranscript
from gateway.stt.scripted import ScriptedEngine
from gateway.transcript.merger import TurnDelta, UtteranceReleased
from gateway.transcript.model import TurnKey, TurnUpdate, Utterance, Word


def _call() -> Call:
    call = Call(ScriptedEngine(()), call_id="c1")
    call.source = "twilio"
    return call


def _update(channel: int, text: str, *, final: bool) -> TurnDelta:
    words = tuple(Word(w, 100, 200) for w in text.split())
    return TurnDelta(TurnUpdate(channel, 0, 0, words, text, 100, 900, final, 0.9))


def _utterance(channel: int, role: str, text: str, start: int) -> UtteranceReleased:
    u = Utterance(channel, role, role, start, start + 500, text, 0.9, (), (TurnKey(channel, 0, 0),))
    return UtteranceReleased(0, u)


def test_terminal_view_rewrites_partials_and_prints_finals() -> None:
    out = io.StringIO()
    view = ConsoleTranscript(out, live=True)
    call = _call()
    view(call, CallStateChanged(CallState.ACTIVE))
    view(call, _update(0, "hel", final=False))
    view(call, _update(1, "yes", final=False))
    view(call, _update(0, "hello there", final=False))
    text = out.getvalue()
    assert text.endswith("\r\x1b[K… channel0: hello there  |  channel1: yes")
    view(call, _update(0, "Hello there.", final=True))
    view(call, _utterance(0, "customer", "Hello there.", 6700))
    text = out.getvalue()
    # The status line is cleared, the final printed as a line, the other partial redrawn.
    assert "\r\x1b[K[00:06.7] customer: Hello there.\n\r\x1b[K… channel1: yes" in text


def test_pipe_view_prints_only_final_lines() -> None:
    out = io.StringIO()
    view = ConsoleTranscript(out, live=False)
    call = _call()
    view(call, _update(0, "hel", final=False))
    view(call, _utterance(1, "agent", "Good morning.", 1234))
    view(call, CallStateChanged(CallState.ENDED, "stop"))
    assert out.getvalue() == "[00:01.2] agent: Good morning.\n-- call c1 ended (stop)\n"
