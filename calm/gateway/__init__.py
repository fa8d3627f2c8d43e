"""The HTTP gateway: an OpenAI-compatible front door to CALM, Prometheus metrics and a live dashboard.

The gateway is one more client of the streams: it pushes each request onto ``calm:queries`` with a
private ``reply_to`` stream and waits for the reply there. It never talks to actors or workers directly.
Entry points: :func:`calm.gateway.app.build_app` and :func:`calm.gateway.app.serve` (``calm gateway``).
This package imports nothing at import time, so ``calm --help`` and the container probes stay light.
"""
