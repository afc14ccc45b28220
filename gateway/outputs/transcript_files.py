"""TranscriptFiles: each finished call's transcript as a JSON file in the data directory.

``DIR/CALL_ID.json`` holds :func:`gateway.transcript.render.to_json` plus the call's source,
source ids, state, end reason and wall-clock start/end. Files are written off the event loop and
atomically (temporary file + rename), so a reader never sees half a transcript.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from gateway.calls.call import Call
from gateway.transcript.render import to_json


def call_document(call: Call) -> dict[str, Any]:
    """The JSON document stored for ``call``."""
    doc = to_json(call.transcript())
    doc.update(
        source=call.source,
        source_ids=dict(call.source_ids),
        state=call.state.value,
        end_reason=call.end_reason,
        started_at=call.started_at,
        ended_at=call.ended_at,
    )
    return doc


class TranscriptFiles:
    """Writes and reads ``DIR/CALL_ID.json`` (see module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, call_id: str) -> Path:
        return self.directory / f"{call_id}.json"

    async def write(self, call: Call) -> Path:
        """Store ``call``'s document; returns the file's path. Raises OSError.

        ``call`` must have ended: its document is built in a worker thread (a long call's
        takes a second or more), which is only safe once nothing changes it any more.
        """
        return await asyncio.to_thread(self._write, call)

    def _write(self, call: Call) -> Path:
        text = json.dumps(call_document(call), indent=2, ensure_ascii=False) + "\n"
        call_id = call.call_id
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(call_id)
        tmp = final.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final
