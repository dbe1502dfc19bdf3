"""comind.deployment_check, the chart's `helm test`: against a fake ps and a fake Kubernetes API."""

from __future__ import annotations

import itertools
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comind import deployment_check
from fake_kube_api import FakeKubeApi

NAMESPACE = "ml"


def statefulset(replicas: int, ready: int | None) -> dict:
    labels = {"app.kubernetes.io/component": "worker"}
    status = {"replicas": replicas} if ready is None else {"replicas": replicas, "readyReplicas": ready}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "comind-worker", "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "serviceName": "comind-worker", "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "worker", "image": "comind:latest"}]}}},
            "status": status}


@pytest.fixture
def ps():
    """A stand-in for the ps: its port accepts connections and serves /metrics with the given text."""
    served = {"text": "# TYPE comind_workers gauge\ncomind_workers 2.0\n# TYPE comind_round gauge\ncomind_round 7.0\n"}

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = served["text"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    yield served, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()


def run_check(address: str, url: str, replicas, timeout: float = 10.0) -> tuple[bool, str]:
    """check() on a fake clock: each poll takes one of its seconds, and nothing really sleeps."""
    ticks = itertools.count()
    return deployment_check.check(address, url, replicas, f"{NAMESPACE}/comind-worker", timeout, interval=1.0,
                                  clock=lambda: next(ticks), sleep=lambda seconds: None)


def test_passes_when_the_ps_counts_every_ready_worker(ps):
    _, address, url = ps
    ok, found = run_check(address, url, lambda: (2, 2))
    assert ok, found
    assert "counts 2 live workers" in found and "2 of the 2 pods of ml/comind-worker are ready (round 7)" in found


def test_waits_for_workers_that_are_still_starting(ps):
    _, address, url = ps
    polls = iter([(2, 0), (2, 1), (2, 2)])
    ok, found = run_check(address, url, lambda: next(polls))
    assert ok, found


@pytest.mark.parametrize(("replicas", "hint"), [
    ((2, 1), "1 of the 2 pods"),                  # a worker that never turns ready
    ((3, 3), "Ready workers that the ps does not count cannot reach it"),
    ((1, 1), "Workers that the chart's workloads do not count hold leases"),
])
def test_fails_with_what_disagrees(ps, replicas, hint):
    _, address, url = ps
    ok, found = run_check(address, url, lambda: replicas)
    assert not ok
    assert found.startswith("after 10 s, the ps at ") and hint in found


def test_fails_when_the_ps_does_not_answer(ps):
    served, address, url = ps
    ok, found = run_check("127.0.0.1:1", url, lambda: (2, 2))
    assert not ok and "does not accept connections at 127.0.0.1:1" in found
    served["text"] = "# TYPE something_else gauge\nsomething_else 1.0\n"
    ok, found = run_check(address, url, lambda: (2, 2))
    assert not ok and "has no comind_workers series" in found


def job(name: str, parallelism: int, ready: int | None) -> dict:
    """A Job as the API server reports it; ``ready`` None leaves the status empty, as before its pods start."""
    labels = {"app.kubernetes.io/component": "worker"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"parallelism": parallelism, "completions": parallelism,
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "worker", "image": "comind:latest"}]}}},
            "status": {} if ready is None else {"active": parallelism, "ready": ready}}


@pytest.fixture
def kube_api(tmp_path, monkeypatch):
    """A fake API server holding the worker StatefulSet, and a kubeconfig that points at it."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: use the kubeconfig
    with FakeKubeApi([statefulset(2, 2)]) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        yield api


def test_reads_the_statefulset_with_the_kubernetes_client(kube_api):
    read = deployment_check.replicas_reader(NAMESPACE, deployment_check.STATEFULSET, ["comind-worker"])
    assert read() == (2, 2)
    kube_api.objects = [statefulset(3, None)]  # no pod ready yet: the API leaves the field out
    assert read() == (3, 0)
    assert kube_api.requests[-1] == f"/apis/apps/v1/namespaces/{NAMESPACE}/statefulsets/comind-worker"


def test_a_statefulset_it_cannot_read_fails_at_once_with_the_reason(kube_api):
    read = deployment_check.replicas_reader(NAMESPACE, deployment_check.STATEFULSET, ["no-such-workers"])
    with pytest.raises(ValueError, match=r"Cannot read StatefulSet ml/no-such-workers: 404 Not Found"):
        read()


def test_reads_the_chief_s_and_the_workers_jobs_and_sums_their_pods(kube_api):
    kube_api.objects = [job("comind-chief", 1, 1), job("comind-worker", 3, None)]
    read = deployment_check.replicas_reader(NAMESPACE, deployment_check.JOB, ["comind-chief", "comind-worker"])
    assert read() == (4, 1)
    kube_api.objects = [job("comind-chief", 1, 1), job("comind-worker", 3, 2)]
    assert read() == (4, 3)
    assert kube_api.requests[-1] == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/comind-worker"


def test_main_prints_the_verdict_and_exits_0_or_1(ps, kube_api, capsys):
    _, address, url = ps
    args = ["--ps-address", address, "--metrics-url", url, "--namespace", NAMESPACE, "--statefulset",
            "comind-worker", "--timeout", "0"]
    assert deployment_check.main(args) == 0
    assert capsys.readouterr().out.startswith(f"ok: the ps at {address} counts 2 live workers")
    kube_api.objects = [statefulset(3, 3)]
    assert deployment_check.main(args) == 1
    assert "FAILED: after 0 s" in capsys.readouterr().err
    kube_api.objects = [job("comind-chief", 1, 1), job("comind-worker", 1, 1)]
    jobs = [*args[:6], "--job", "comind-chief", "--job", "comind-worker", "--timeout", "0"]
    assert deployment_check.main(jobs) == 0
    assert f"2 of the 2 pods of Jobs {NAMESPACE}/comind-chief, {NAMESPACE}/comind-worker are ready" in \
        capsys.readouterr().out
