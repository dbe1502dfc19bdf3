"""Reading a process's Prometheus endpoint, for the tests that check metrics."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from comind.metrics import UPDATE_RESULTS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
