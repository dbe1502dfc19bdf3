"""Network namespaces joined by a bridge, for partition tests (needs root).

Every node (the ps, each worker) gets a namespace of its own with one veth
link into a switch namespace that holds a bridge, so the nodes talk over a
real IP network rather than loopback. Cutting a node drops all of its
traffic with iptables inside its own namespace: packets vanish silently, as
in a real network split, so TCP sees neither a reset nor an error, only
silence until some timeout fires.
"""

from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.213.0"


def available() -> str | None:
    """Why partition tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install-test-tools installs it)"
    return None


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


class Network:
    """A bridged IP network of named nodes; ``cut`` and ``heal`` partition one node."""

    def __init__(self) -> None:
        self._prefix = f"cm{os.getpid()}"
        self._switch = f"{self._prefix}-switch"
        self._nodes: dict[str, str] = {}
        _run("ip", "netns", "add", self._switch)
        _run("ip", "-n", self._switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self._switch, "link", "set", "br0", "up")

    def add(self, node: str) -> str:
        """Creates the node's namespace and link; returns its IP address."""
        namespace = f"{self._prefix}-{node}"
        address = f"{SUBNET}.{len(self._nodes) + 1}"
        port = f"p{len(self._nodes)}"
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", port, "netns", self._switch, "type", "veth", "peer", "name", "eth0",
             "netns", namespace)
        _run("ip", "-n", self._switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        _run("ip", "-n", namespace, "link", "set", "eth0", "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        self._nodes[node] = namespace
        return address

    def command(self, node: str, *argv: str) -> list[str]:
        """``argv`` run inside the node's namespace."""
        return ["ip", "netns", "exec", self._nodes[node], *argv]

    def cut(self, node: str) -> None:
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run(*self.command(node, "iptables", "-A", chain, direction, "eth0", "-j", "DROP"))

    def heal(self, node: str) -> None:
        for chain in ("INPUT", "OUTPUT"):
            _run(*self.command(node, "iptables", "-F", chain))

    def close(self) -> None:
        # Deleting a namespace removes its end of the veth, and with it the peer.
        for namespace in [*self._nodes.values(), self._switch]:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        self._nodes.clear()
