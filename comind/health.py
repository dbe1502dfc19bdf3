"""``comind health``: the image's health check, in Python (the image has no curl).

A ps is healthy when its gRPC port accepts connections; any process with
metrics on is healthy when ``/metrics`` answers.
"""

from __future__ import annotations

import socket
import urllib.request

from comind.metrics import url_host
from comind.settings import PsSettings, WorkerSettings

TIMEOUT_SECONDS = 3.0
#: A server bound to every address is reached here on loopback; one bound to one address, on that address.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def _reachable(host: str) -> str:
    return _LOOPBACK.get(host, host)


def problem(settings: PsSettings | WorkerSettings) -> str | None:
    """What is wrong with this container's process (a ps, or a worker), or None if it is healthy."""
    if isinstance(settings, PsSettings):
        host, _, port_text = settings.listen.rpartition(":")
        port = int(port_text)
        try:
            socket.create_connection((_reachable(host.strip("[]")), port), timeout=TIMEOUT_SECONDS).close()
        except OSError as error:
            return f"the ps does not accept connections on port {port} ({error})"
    if settings.metrics_port:
        url = f"http://{url_host(_reachable(settings.metrics_host), settings.metrics_port)}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                response.read(1)
        except OSError as error:
            return f"{url} does not answer ({error})"
    return None
