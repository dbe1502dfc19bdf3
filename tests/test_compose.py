"""`docker compose up` of the real compose.yaml: real containers, a real Prometheus."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from compose_cluster import ROOT, Cluster, build_image, docker_or_skip
from scrape import free_port

ROUND = re.compile(r"Round (\d+)/(\d+): \d+ updates")


@pytest.fixture(scope="module")
def docker_client():
    return docker_or_skip()


@pytest.fixture(scope="module")
def base_image(docker_client):
    return build_image()


@pytest.fixture
def cluster(docker_client, base_image, tmp_path):
    made = []

    def make(**settings: str) -> Cluster:
        made.append(Cluster(docker_client, base_image, tmp_path / f"output-{len(made)}", **settings))
        return made[-1]

    yield make
    for cluster in made:
        cluster.down()


def test_compose_passes_the_asynchronous_rounds_settings_with_the_ps_defaults():
    """A render check, no container: each variable reaches the ps with the ps's own default, or unset."""
    from comind.settings import load

    compose = (ROOT / "compose.yaml").read_text()
    defaults = dict(re.findall(r"(COMIND_(?:ROUNDS_MODE|BUFFER_SIZE|STALENESS_EXPONENT|MAX_STALENESS)): "
                               r"\$\{\1:-([^}]*)\}", compose))
    assert set(defaults) == {"COMIND_ROUNDS_MODE", "COMIND_BUFFER_SIZE", "COMIND_STALENESS_EXPONENT",
                             "COMIND_MAX_STALENESS"}
    assert load("ps", {}, defaults) == load("ps", {}, {})
    given = load("ps", {}, {**defaults, "COMIND_ROUNDS_MODE": "async", "COMIND_BUFFER_SIZE": "3"})
    assert (given.rounds_mode, given.buffer_size) == ("async", 3)


def rounds_closed(log: str) -> list[int]:
    return [int(r) for r, _ in ROUND.findall(log)]


def test_compose_up_trains_to_the_end_and_down_leaves_nothing(cluster):
    # With secure aggregation on: the ps learns only each round's sum (the default is off; the other tests run so).
    project = cluster(COMIND_SECURE_AGGREGATION="true")
    result = project.compose("up", timeout=600)
    assert result.returncode == 0, result.stderr

    states = {c.labels["com.docker.compose.service"]: c.attrs["State"] for c in project.containers()}
    assert {s: (st["Status"], st["ExitCode"]) for s, st in states.items()} == {
        s: ("exited", 0) for s in ("certificates", "ps", "worker-0", "worker-1")}
    ps_log = project.logs("ps")
    assert re.search(r"Listening on \S+ \(TLS\)", ps_log)  # the workers trained over TLS, with the token
    total = int(ROUND.search(ps_log).group(2))
    assert rounds_closed(ps_log) == list(range(1, total + 1))
    unmasked = re.findall(r"Round (\d+)'s sum of 2 masked inputs unmasked", ps_log)
    assert [int(r) for r in unmasked] == list(range(1, total + 1))
    assert "Final test accuracy" in project.logs("worker-0")
    output = project.copy_output()  # compose.yaml's `docker compose cp worker-0:/output ./comind-output`
    # Copied as the user who ran it: no root helper, and nothing world-writable.
    assert all(f.stat().st_uid == os.getuid() and not f.stat().st_mode & 0o002 for f in (output, *output.rglob("*")))
    assert (output / "tensorboard").is_dir()
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["final"]["round"] == total and metrics["final"]["eval_accuracy"] >= 0.90
    for picture in ("predictions.png", "history.png", "model.keras"):
        assert (output / picture).stat().st_size > 1000

    project.down()
    assert project.leftovers() == []


def query(prometheus: str, path: str, **params: str) -> list:
    url = f"{prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """Debian's Prometheus, scraping with the shipped config; only the targets point at the published ports."""
    started = []

    def start(ports: dict[str, int]) -> str:
        config = (ROOT / "monitoring" / "prometheus.yml").read_text()
        for service, port in ports.items():
            config = config.replace(f'"{service}:8000"', f'"127.0.0.1:{port}"')
        (tmp_path / "prometheus.yml").write_text(config)
        (tmp_path / "alerts.yml").write_bytes((ROOT / "monitoring" / "alerts.yml").read_bytes())
        port = free_port()
        started.append(subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{address}/-/ready", timeout=2):
                    return address
            except OSError:
                time.sleep(0.5)  # a bounded wait for a process we just started
        raise AssertionError("Prometheus did not become ready in 60 s")

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_prometheus_scrapes_rounds_and_a_falling_loss(cluster, prometheus):
    # Synchronous steps (one per round) make a run long enough for several 5 s scrapes.
    project = cluster(COMIND_INTERVAL_STEPS="1", COMIND_ROUNDS="1500")
    address = prometheus(project.ports)
    started = time.time()
    project.compose("up", "--detach")
    assert project.wait_for_exit("worker-0", timeout=600) == 0
    time.sleep(6)  # one more scrape interval, so the last values are in
    window = f"{int(time.time() - started) + 60}s"

    assert float(query(address, "query", query=f"max(max_over_time(comind_rounds_completed_total[{window}]))")[0]
                 ["value"][1]) > 0
    up = query(address, "query", query=f"max_over_time(up[{window}])")
    assert sorted(r["metric"]["instance"] for r in up if r["value"][1] == "1") == sorted(
        f"127.0.0.1:{p}" for p in project.ports.values())
    [loss] = query(address, "query_range", query="comind_train_loss", start=str(started), end=str(time.time()),
                   step="1")
    values = [float(v) for _, v in loss["values"] if math.isfinite(float(v))]  # NaN before round 1
    assert len(set(values)) >= 2 and values[-1] < values[0]
    # The alerts are loaded and, over a run that trained to the end, none fired.
    with urllib.request.urlopen(f"{address}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    alerts = {rule["name"]: rule["state"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert "ComindTrainingStalled" in alerts and "firing" not in alerts.values(), alerts


def test_training_survives_a_killed_worker_and_a_restarted_ps(cluster):
    project = cluster(COMIND_INTERVAL_STEPS="20", COMIND_ROUNDS="100")
    project.compose("up", "--detach")
    project.wait_for_log("ps", r"Round 5/100")
    project.container("worker-1").kill()
    project.wait_for_log("ps", r"Round 10/100")
    project.compose("restart", "ps")
    assert project.wait_for_exit("worker-0", timeout=600) == 0
    assert project.wait_for_exit("ps", timeout=120) == 0

    log = project.logs("ps")
    closed = rounds_closed(log)
    resumed = [int(r) for r in re.findall(r"Resumed from \S+ at round (\d+)", log)]
    assert resumed and resumed[0] >= 10
    assert closed == sorted(closed) and closed[-1] == 100  # never backwards, and to the end
    assert len(closed) == len(set(closed))  # no round closed twice
    assert "Final test accuracy" in project.logs("worker-0")
