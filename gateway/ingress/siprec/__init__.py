"""SIPREC (RFC 7865/7866) Session Recording Server: sans-I/O cores.

- :mod:`.message`: SIP message parser/serializer (``SipParser``, ``build_response``);
- :mod:`.sdp`: offer parsing and the ``recvonly`` answer (``parse_sdp``, ``negotiate``, ``answer``);
- :mod:`.metadata`: multipart splitting and rs-metadata in its dialects (``split_body``,
  ``parse_metadata``);
- :mod:`.participants`: streams and participants to channels and roles (``map_channels``);
- :mod:`.rtp`: RTP parsing, the jitter buffer and per-channel events (``CallMedia``);
- :mod:`.auth`: source allowlist and digest authentication;
- :mod:`.dialog`: the UAS transaction/dialog state machine (``SiprecServer``).

None of these modules imports asyncio or touches a socket or a clock; the transports feed them
bytes and times and carry out what they return. The thin asyncio shells around them:

- :mod:`.transport`: SIP listeners on UDP, TCP and TLS (``SipTransports``);
- :mod:`.rtp_ports`: RTP socket pairs from the configured port range (``RtpPorts``);
- :mod:`.service`: ``SiprecService``, the SRS inside ``gateway serve`` (calls, timers, drain).
"""
