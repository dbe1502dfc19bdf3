"""Secure aggregation's cost: time per round, bytes on the wire and the ps's CPU, with and without it.

For 2, 8 and 64 workers and a 0.4 MB and a 10 MB model, a real ``comind ps`` process and ``WorkerClient``
workers (threads in a few processes, as ``bench/core.py``'s fleet) sync back to back with no training in between
(a small constant change a round), with ``--secure-aggregation`` and without. Per round it reports:

* time: from one round's model reaching the last worker to the next's, the median over the measured rounds;
* bytes: the ps's own counts of what crossed the wire, by stage (``comind_secagg_bytes_total``: keys, shares,
  masked inputs, unmask shares; ``comind_update_bytes_total``: plain updates and models), per worker and round;
  the protocol's message bytes, without gRPC's framing;
* ps CPU: user + system seconds of the ps process per round (/proc/PID/stat).

Targets (issue 15): masked inputs at most 4 bytes per parameter (Flower 1.42's SecAgg+ sends 8), keys and shares
O(k) per worker (k: neighbours), and 8 workers with a 0.4 MB model at most 2x the plain round's time.

    .venv/bin/python bench/secagg.py [--quick]

It prints a table and writes the same text to ``bench/results/secagg.txt``. Other load on the machine shows in the
figures; the report prints the load average it started under. MB are decimal (10**6 bytes).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import socket
import statistics
import sys
import time
import urllib.request
from collections.abc import Sequence

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from comind import WorkerClient
from core import MB, ROOT, Row, Section, client_process, machine_facts, make_model, parse_flags, write_report

RESULTS = ROOT / "bench" / "results" / "secagg.txt"
#: Each round every value changes by this: well inside the clipping range.
CHANGE = np.float32(1e-3)
#: With 64 workers of a 10 MB model masking on 2 cores, a worker's renewals waited past the default 10 s lease.
LEASE_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Case:
    workers: int
    model_bytes: int
    rounds: int  # the first is not measured (joining, the initial model)
    processes: int


FULL = [Case(2, 400_000, 11, 2), Case(8, 400_000, 11, 4), Case(64, 400_000, 5, 8),
        Case(2, 10 * MB, 6, 2), Case(8, 10 * MB, 4, 4), Case(64, 10 * MB, 3, 8)]
QUICK = [Case(2, 400_000, 4, 2), Case(8, 400_000, 4, 4), Case(64, 400_000, 3, 8),
         Case(2, 10 * MB, 3, 2), Case(8, 10 * MB, 3, 4), Case(64, 10 * MB, 2, 8)]


def run_client(address: str, task: int, weights: list[np.ndarray], rounds: int) -> tuple[WorkerClient, list[float]]:
    client = WorkerClient(address, task_index=task, description=f"bench {task}")
    state = client.join(weights)
    returned = []
    for _ in range(rounds):
        state = client.sync([w + CHANGE for w in state.weights], num_examples=100)
        returned.append(time.perf_counter())
    return client, returned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Result:
    round_seconds: float
    bytes: dict[str, float]  # by stage or direction, per worker and round
    cpu_seconds: float       # the ps's, per measured round


def per_round(counters: dict[tuple[str, tuple], float], case: Case) -> dict[str, float]:
    """Bytes per worker and round, by stage or direction, from the ps's counts over the whole run.

    Over the whole run, not a window: the ps's log says a round closed while its model still goes out, and the
    next round's updates come in, so a window's edges split rounds. Every worker received ``rounds`` + 1 models
    (the initial one too) and sent ``rounds`` updates, and the chief the initial model besides.
    """
    initial = sum(array.nbytes for array in make_model(case.model_bytes))
    counted = {}
    for (name, labels), value in counters.items():
        if name in ("comind_secagg_bytes_total", "comind_update_bytes_total"):
            label = dict(labels).get("stage") or dict(labels)["direction"]
            if label == "sent":
                counted[label] = value / (case.rounds + 1) / case.workers
            else:
                counted[label] = (value - (initial if label == "received" else 0)) / case.rounds / case.workers
    return counted


def run(case: Case, secure: bool) -> Result:
    sys.path.insert(0, str(ROOT / "tests"))
    from processes import PsProcess

    port = free_port()
    ps = PsProcess(["--rounds", str(case.rounds), "--num-workers", str(case.workers), "--exit-grace", "5",
                    "--metrics-port", str(port), "--round-timeout", "900", "--lease-seconds", str(LEASE_SECONDS),
                    *(["--secure-aggregation"] if secure else [])])
    context = multiprocessing.get_context("spawn")
    results, release = context.Queue(), context.Event()
    workers = [context.Process(target=client_process, daemon=True, args=(
        ps.address, range(case.workers)[i::case.processes], case.model_bytes, case.rounds, results, release,
        run_client))
        for i in range(case.processes)]
    try:
        for worker in workers:
            worker.start()
        ps.wait_for(r"Round 1/", timeout=900)
        cpu_before = cpu_seconds(ps.proc.pid)
        times: list[float] = []
        for _ in workers:
            status, payload = results.get(timeout=900)
            if status != "ok":
                raise RuntimeError(f"A worker process failed:\n{payload}\nps log:\n{ps.log()[-5000:]}")
            times.extend(payload)  # each worker's ``rounds`` times, one worker after another
        after, cpu_after = scrape(port), cpu_seconds(ps.proc.pid)
        release.set()
        for worker in workers:
            worker.join(timeout=60)
        # A round ends when its model reaches the last worker.
        ends = np.reshape(times, (case.workers, case.rounds)).max(axis=0)
        measured = case.rounds - 1
        return Result(statistics.median(np.diff(ends)), per_round(after, case),
                      (cpu_after - cpu_before) / measured)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        ps.stop()


def section(cases: Sequence[Case]) -> Section:
    rows = []
    for case in cases:
        params = case.model_bytes // 4
        name = f"{case.workers:>2} workers, {case.model_bytes / MB:g} MB"
        print(f"{name}: plain ...", file=sys.stderr, flush=True)
        plain = run(case, secure=False)
        print(f"{name}: secure ...", file=sys.stderr, flush=True)
        secure = run(case, secure=True)
        ratio = secure.round_seconds / plain.round_seconds
        rows.append(Row(f"{name}, round time plain / secure",
                        f"{plain.round_seconds * 1e3:8.1f} / {secure.round_seconds * 1e3:8.1f} ms  x{ratio:.2f}",
                        "<= x2" if (case.workers, case.model_bytes) == (8, 400_000) else "",
                        ratio <= 2 if (case.workers, case.model_bytes) == (8, 400_000) else None))
        masked = secure.bytes["masked_input"] / params
        rows.append(Row(f"{name}, masked input per parameter", f"{masked:.3f} B (plain update "
                        f"{plain.bytes['received'] / params:.3f} B)", "<= 4 B", masked <= 4))
        keys = secure.bytes["advertise"] + secure.bytes["share"] + secure.bytes["unmask"]
        rows.append(Row(f"{name}, keys and shares per worker", f"{keys / 1e3:.1f} kB (advertise "
                        f"{secure.bytes['advertise'] / 1e3:.1f}, share {secure.bytes['share'] / 1e3:.1f}, unmask "
                        f"{secure.bytes['unmask'] / 1e3:.1f})"))
        rows.append(Row(f"{name}, ps CPU per round plain / secure",
                        f"{plain.cpu_seconds:.3f} / {secure.cpu_seconds:.3f} s"))
    return Section("Per round, plain and secure aggregation", rows, (
        "Round time: median over the measured rounds of the gap between two rounds' models reaching the last "
        "worker.",
        "Bytes: the ps's counts per worker and round (message bytes, without gRPC framing); keys and shares grow "
        "with k, each worker's neighbours: everyone up to 20 workers, 18 for 64 (SecAgg+).",
        "Workers are threads in 2 to 8 processes on the same machine as the ps: their masking competes with the "
        "ps for the CPUs."))


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(__doc__, RESULTS, argv)
    started = time.perf_counter()
    cases = QUICK if flags.quick else FULL
    header = ["coMind secure aggregation benchmark", *machine_facts(),
              f"run       {'quick' if flags.quick else 'full'}: rounds per case "
              f"{', '.join(str(c.rounds) for c in cases)} (the first not measured)"]
    write_report(header, [section(cases)], started, flags.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
