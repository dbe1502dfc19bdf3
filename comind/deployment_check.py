"""The Helm chart's ``helm test``: the ps answers, and counts every ready worker.

Run in the chart's test pod as ``python -m comind.deployment_check``. It
checks that the ps accepts connections on its gRPC port, reads the live
workers it counts (``comind_workers``) from its metrics, and reads the
workers' StatefulSet (the chart's ``lifecycle: serve``) or Jobs (``train``:
the chief's and the other workers') through the Kubernetes API (the
``kubernetes`` package; the pod's service account in a cluster, a kubeconfig
elsewhere). It passes when every pod they want is ready and the ps counts
exactly that many live workers. Workers start at their own pace, and one
turns ready when it serves its metrics, a moment before it registers with
the ps, so the check waits up to ``--timeout`` seconds for that. Exit status
0 when it passes, 1 with the reason when not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_SECONDS = 5.0


class Unanswered(Exception):
    """The ps did not answer (yet): worth another try."""


def ps_counts(ps_address: str, metrics_url: str) -> tuple[int, int]:
    """The live workers the ps counts and its last completed round.

    Raises:
        Unanswered: the gRPC port refused the connection, or the metrics did
            not answer or lack ``comind_workers``.
    """
    host, _, port = ps_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT_SECONDS).close()
    except OSError as error:
        raise Unanswered(f"the ps does not accept connections at {ps_address} ({error})") from None
    try:
        with urllib.request.urlopen(metrics_url, timeout=TIMEOUT_SECONDS) as response:
            text = response.read().decode()
    except OSError as error:
        raise Unanswered(f"the ps's metrics at {metrics_url} do not answer ({error})") from None
    samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples}
    if "comind_workers" not in samples:
        raise Unanswered(f"{metrics_url} has no comind_workers series: is it the ps's?")
    return int(samples["comind_workers"]), int(samples.get("comind_round", -1))


STATEFULSET, JOB = "StatefulSet", "Job"


def replicas_reader(namespace: str, kind: str, names: Sequence[str]) -> Callable[[], tuple[int, int]]:
    """A function that reads the (wanted, ready) pods of StatefulSet or Jobs ``namespace/name``, summed.

    A StatefulSet wants its replicas; a Job its parallelism, the pods it runs at once.

    Raises:
        ValueError: the ``kubernetes`` package or the API credentials are missing.
    """
    try:
        from kubernetes import client, config
    except ImportError:
        raise ValueError("The deployment check needs the kubernetes package in the image "
                         "(pip install kubernetes).") from None
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):  # in a pod: its service account
            config.load_incluster_config()
        else:  # KUBECONFIG as it is now (the client reads it once, when imported)
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except config.ConfigException as error:
        raise ValueError(f"No credentials for the Kubernetes API: {error}") from None
    apps, batch = client.AppsV1Api(), client.BatchV1Api()

    def read_one(name: str) -> tuple[int, int]:
        try:
            # A status is None until the controller first reports.
            if kind == STATEFULSET:
                statefulset = apps.read_namespaced_stateful_set(name, namespace)
                wanted = statefulset.spec.replicas
                ready = statefulset.status.ready_replicas if statefulset.status else None
            else:
                job = batch.read_namespaced_job(name, namespace)
                wanted = job.spec.parallelism if job.spec else None
                ready = job.status.ready if job.status else None
        except client.ApiException as error:
            raise ValueError(f"Cannot read {kind} {namespace}/{name}: {error.status} {error.reason}. "
                             f"The test's Role grants get on the workers' {kind}s alone.") from None
        # The API server fills in 1 for replicas or parallelism left unset.
        return 1 if wanted is None else wanted, ready or 0

    def read() -> tuple[int, int]:
        counts = [read_one(name) for name in names]
        return sum(wanted for wanted, _ in counts), sum(ready for _, ready in counts)

    return read


def check(ps_address: str, metrics_url: str, replicas: Callable[[], tuple[int, int]], workers: str,
          timeout: float, interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str]:
    """Waits until every replica is ready and the ps counts them all live; returns (passed, what was found)."""
    deadline = clock() + timeout
    while True:
        try:
            live, round = ps_counts(ps_address, metrics_url)
            desired, ready = replicas()
            counts = (f"the ps at {ps_address} counts {live} live workers, and {ready} of the {desired} pods of "
                      f"{workers} are ready (round {round})")
            if live == ready == desired:
                return True, counts + "."
            if ready < desired:
                hint = ("Workers that stay unready fail to start, or finished training and are restarting: see "
                        "kubectl describe and kubectl logs.")
            elif live < ready:
                hint = ("Ready workers that the ps does not count cannot reach it: check their logs, "
                        "COMIND_PS_ADDRESS, the token, TLS and the NetworkPolicy.")
            else:
                hint = ("Workers that the chart's workloads do not count hold leases: pods that are stopping, or "
                        "workers from outside the release.")
            found = f"{counts}. {hint}"
        except Unanswered as error:
            found = str(error)
        if clock() >= deadline:
            return False, f"after {timeout:.0f} s, {found}"
        sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comind.deployment_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ps-address", required=True, help="host:port of the ps's gRPC port")
    parser.add_argument("--metrics-url", required=True, help="URL of the ps's /metrics")
    parser.add_argument("--namespace", required=True, help="namespace of the workers' StatefulSet or Jobs")
    workloads = parser.add_mutually_exclusive_group(required=True)
    workloads.add_argument("--statefulset", help="name of the workers' StatefulSet")
    workloads.add_argument("--job", action="append", help="name of a Job of workers (repeat for each)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for agreement [120]")
    flags = parser.parse_args(argv)
    kind, names = (STATEFULSET, [flags.statefulset]) if flags.statefulset else (JOB, flags.job)
    described = f"{kind}{'s' if len(names) > 1 else ''} " + ", ".join(f"{flags.namespace}/{n}" for n in names)
    try:
        reader = replicas_reader(flags.namespace, kind, names)
        ok, found = check(flags.ps_address, flags.metrics_url, reader, described, flags.timeout)
    except ValueError as error:
        ok, found = False, str(error)
    print(f"{'ok' if ok else 'FAILED'}: {found}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
