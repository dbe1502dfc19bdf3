"""``comind health``: the image's health check, in Python (the image has no curl).

A ps is healthy when its gRPC port accepts connections; any process with
metrics on is healthy when ``/metrics`` answers.
"""

from __future__ import annotations

import socket
import urllib.request

from comind.settings import PsSettings, WorkerSettings

TIMEOUT_SECONDS = 3.0


def problem(settings: PsSettings | WorkerSettings) -> str | None:
    """What is wrong with this container's process (a ps, or a worker), or None if it is healthy."""
    if isinstance(settings, PsSettings):
        port = int(settings.listen.rpartition(":")[2])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS).close()
        except OSError as error:
            return f"the ps does not accept connections on port {port} ({error})"
    if settings.metrics_port:
        url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                response.read(1)
        except OSError as error:
            return f"{url} does not answer ({error})"
    return None
