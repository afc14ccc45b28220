"""Call simulators: play a recorded call into a gateway exactly as a telephony platform would.

:mod:`gateway.simulate.twilio` speaks Twilio Media Streams (and the Telnyx / SignalWire dialects)
as the WebSocket client; :mod:`gateway.simulate.cli` is ``gateway simulate``.
"""
