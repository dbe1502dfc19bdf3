"""Runs the real compose.yaml as a throwaway compose project, for the container tests."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import docker
import pytest

from scrape import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
SERVICES = ("ps", "worker-0", "worker-1")


def docker_or_skip() -> docker.DockerClient:
    """A Docker client; without an engine, CI fails and a developer's run skips."""
    try:
        client = docker.from_env()
        client.ping()
        return client
    except docker.errors.DockerException as error:
        message = f"no Docker engine ({error}); ./scripts/setup --for-tests installs and starts one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def build_image() -> str:
    """Builds the image through compose from the base image that can be had here; returns that base."""
    base = subprocess.run([ROOT / "scripts" / "base-image"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["docker", "compose", "-f", COMPOSE_FILE, "build", "ps"], cwd=ROOT, check=True,
                   env={**os.environ, "BASE_IMAGE": base}, capture_output=True)
    return base


class Cluster:
    """One compose project of the real compose.yaml, with its own name, host ports and output folder."""

    def __init__(self, client: docker.DockerClient, base_image: str, output: Path, **settings: str):
        self.client = client
        self.project = f"comind-test-{uuid.uuid4().hex[:8]}"
        self.output = output
        self.ports = {service: free_port() for service in SERVICES}
        self.env = {**os.environ, "BASE_IMAGE": base_image,
                    "COMIND_PS_METRICS_HOST_PORT": str(self.ports["ps"]),
                    "COMIND_WORKER0_METRICS_HOST_PORT": str(self.ports["worker-0"]),
                    "COMIND_WORKER1_METRICS_HOST_PORT": str(self.ports["worker-1"]), **settings}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "-f", COMPOSE_FILE, "-p", self.project, *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def copy_output(self) -> Path:
        """The chief's outputs, copied out of the `output` volume as compose.yaml says: into ``self.output``."""
        self.compose("cp", "worker-0:/output", str(self.output))
        return self.output

    def containers(self) -> list:
        return self.client.containers.list(all=True, filters={"label": f"com.docker.compose.project={self.project}"})

    def container(self, service: str):
        [found] = [c for c in self.containers() if c.labels["com.docker.compose.service"] == service]
        return found

    def logs(self, service: str) -> str:
        return self.container(service).logs().decode()

    def wait_for_log(self, service: str, pattern: str, timeout: float = 300) -> re.Match:
        """The first line of ``service``'s log (from its start) matching ``pattern``, as it comes."""
        lines: queue.Queue = queue.Queue()
        stream = self.container(service).logs(stream=True, follow=True)

        def pump() -> None:
            for chunk in stream:
                for line in chunk.decode(errors="replace").splitlines():
                    lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=remaining)
                except queue.Empty:
                    break
                if line is None:
                    break
                match = re.search(pattern, line)
                if match:
                    return match
        finally:
            stream.close()
        raise AssertionError(f"{service} never logged {pattern!r}; its log:\n{self.logs(service)[-4000:]}")

    def wait_for_exit(self, service: str, timeout: float = 300) -> int:
        return self.container(service).wait(timeout=timeout)["StatusCode"]

    def leftovers(self) -> list[str]:
        label = {"label": f"com.docker.compose.project={self.project}"}
        return ([f"container {c.name}" for c in self.client.containers.list(all=True, filters=label)]
                + [f"volume {v.name}" for v in self.client.volumes.list(filters=label)]
                + [f"network {n.name}" for n in self.client.networks.list(filters=label)])

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
