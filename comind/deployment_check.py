"""The Helm chart's ``helm test``: the ps answers, and counts every ready worker.

Run in the chart's test pod as ``python -m comind.deployment_check``. It
checks that the ps accepts connections on its gRPC port, reads the live
workers it counts (``comind_workers``) from its metrics, and reads the
worker StatefulSet through the Kubernetes API (the ``kubernetes`` package;
the pod's service account in a cluster, a kubeconfig elsewhere). It passes
when every replica of the StatefulSet is ready and the ps counts exactly
that many live workers. Workers start at their own pace, and one turns
ready when it serves its metrics, a moment before it registers with the ps,
so the check waits up to ``--timeout`` seconds for that. Exit status 0 when
it passes, 1 with the reason when not, 2 for bad arguments.
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


def replicas_reader(namespace: str, name: str) -> Callable[[], tuple[int, int]]:
    """A function that reads StatefulSet ``namespace/name``'s (desired, ready) replicas.

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
    apps = client.AppsV1Api()

    def read() -> tuple[int, int]:
        try:
            statefulset = apps.read_namespaced_stateful_set(name, namespace)
        except client.ApiException as error:
            raise ValueError(f"Cannot read StatefulSet {namespace}/{name}: {error.status} {error.reason}. "
                             f"The test's Role grants get on that StatefulSet alone.") from None
        desired = statefulset.spec.replicas
        status = statefulset.status  # None until the controller first reports
        # The API server fills in 1 for replicas left unset.
        return 1 if desired is None else desired, (status.ready_replicas if status else None) or 0

    return read


def check(ps_address: str, metrics_url: str, replicas: Callable[[], tuple[int, int]], statefulset: str,
          timeout: float, interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> tuple[bool, str]:
    """Waits until every replica is ready and the ps counts them all live; returns (passed, what was found)."""
    deadline = clock() + timeout
    while True:
        try:
            live, round = ps_counts(ps_address, metrics_url)
            desired, ready = replicas()
            counts = (f"the ps at {ps_address} counts {live} live workers and StatefulSet {statefulset} has "
                      f"{ready} of {desired} replicas ready (round {round})")
            if live == ready == desired:
                return True, counts + "."
            if ready < desired:
                hint = ("Workers that stay unready fail to start, or finished training and are restarting: see "
                        "kubectl describe and kubectl logs.")
            elif live < ready:
                hint = ("Ready workers that the ps does not count cannot reach it: check their logs, "
                        "COMIND_PS_ADDRESS, the token, TLS and the NetworkPolicy.")
            else:
                hint = ("Workers that the StatefulSet does not count hold leases: pods that are stopping, or "
                        "workers from outside the StatefulSet.")
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
    parser.add_argument("--namespace", required=True, help="namespace of the worker StatefulSet")
    parser.add_argument("--statefulset", required=True, help="name of the worker StatefulSet")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for agreement [120]")
    flags = parser.parse_args(argv)
    try:
        reader = replicas_reader(flags.namespace, flags.statefulset)
        ok, found = check(flags.ps_address, flags.metrics_url, reader, f"{flags.namespace}/{flags.statefulset}",
                          flags.timeout)
    except ValueError as error:
        ok, found = False, str(error)
    print(f"{'ok' if ok else 'FAILED'}: {found}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
