"""Callgate: a gateway from live call audio to speaker-ordered call transcripts."""

__version__ = "0.1.0"
