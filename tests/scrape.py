"""Reading a process's Prometheus endpoint, for the tests that check metrics."""

from __future__ import annotations

import random
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from comind.metrics import UPDATE_RESULTS

#: Ports below Linux's ephemeral range (32768 and up): the kernel never gives one of them to an outgoing
#: connection, so a port found free here is still free when a server binds it a moment later, unless another
#: server took it. A port the kernel picks (bind to 0) may meanwhile become the source port of a connection.
LISTEN_PORTS = range(20000, 32768)


def free_port(count: int = 1) -> int:
    """A port nothing listens on, below the ephemeral range; the first of ``count`` such ports in a row."""
    for port in random.sample(LISTEN_PORTS[:-count], 200):
        if all(_free(p) for p in range(port, port + count)):
            return port
    raise AssertionError(f"No {count} free ports in a row in {LISTEN_PORTS} after 200 tries")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))  # as a published or metrics port binds: every address
        except OSError:
            return False
        return True


class Scrape:
    """One scrape of ``/metrics`` on a local port; call it with a sample name and labels for the value."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        self.samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for family in text_string_to_metric_families(text) for s in family.samples}

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in self.samples, (f"{name}{labels} is not exposed; have "
                                     f"{sorted(k for k in self.samples if 'comind' in k[0])}")
        return self.samples[key]

    def updates(self) -> dict[str, float]:
        """``comind_updates_total`` by result."""
        return {result: self("comind_updates_total", result=result) for result in UPDATE_RESULTS}
