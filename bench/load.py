"""Load on one ps: 1,000 workers all in each round, 10,000 connected with 100 per round, and a 10 MB model.

A real ``comind ps`` process (token on, metrics on) serves a swarm of
simulated workers, ``bench/swarm.py``: a few processes of asyncio gRPC
clients that send a zero change as soon as they receive the model, so the
ps is under as much load as those clients can make. For each scenario it reports:

* round latency, from the clients' clocks: per round, from the first push
  for it until the last worker its model goes to holds it (``round``: every
  worker without sampling; the next round's selected workers with it); per
  worker and round, from its Round call's start until it holds that round's
  model (``sync``, what ``comind_worker_sync_duration_seconds`` measures; with
  sampling, only for workers selected again at once); and the ps's own
  ``comind_round_duration_seconds`` (round opened until published) as a
  bucket bound;
* the ps's peak RSS (VmHWM), and the CPU seconds that it and the load
  generators spent while the measured rounds ran (from the ps's log line of
  the last warm-up round to that of the last measured round): on a machine
  they share, a round cannot be shorter than the two together divided by
  the cores;
* with sampling, the ps's CPU per idle worker per minute: the chief holds the
  initial model back until every worker has joined and waits in its Round
  call (renewals, long polls), and the ps's CPU is measured over that window;
* ``comind_updates_total`` by result, scraped from ``/metrics``: every update
  must be accepted, none stale or rejected, and no worker may see an error;
  every round must close with all the updates it asked for.

The first rounds, which include the joins and first models, are a warm-up
and not counted. With sampling, the final round is not counted either: the
ps sends the final model to every connected worker. Targets (issue 17): ps
CPU at most 0.5 s per round with 1,000 workers of a 0.4 MB model; with
10,000 connected and 100 per round, peak RSS at most 1.5 GB and round p50 at
most 0.5 s; 64 workers of a 10 MB model, round p99 at most 1 s, with float32
updates and with int8.

Run it from the repository root (a few minutes on 2 cores). The load
generators share the machine with the ps, and so does anything else
running, so the report prints the load average it started under:

    .venv/bin/python bench/load.py [--quick] [--only 10,000] [--population 4000]

It prints a table and, last, one JSON line per scenario (``workers``,
``clients_per_round``, ``model_bytes``, ``rounds``, ``ps_cpu_s_per_round``,
``round_p50_s``, ``round_p99_s``, ``ps_peak_rss_mb``, ``refused`` and a few
more), and writes the same text to ``bench/results/load.txt``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import grpc_floor
from comind import encodings
from comind.metrics import UPDATE_RESULTS
from comind.protocol import LONG_POLL_SECONDS
from comind.tensors import Layout
from core import (
    MB,
    ROOT,
    Row,
    Section,
    machine_facts,
    make_model,
    parse_flags,
    proc_status_kib,
    progress,
    start_ps,
    write_report,
)

sys.path.insert(0, str(ROOT / "tests"))
from scrape import Scrape, free_port  # the tests' /metrics reader

RESULTS = ROOT / "bench" / "results" / "load.txt"
SWARM = Path(__file__).with_name("swarm.py")
TOKEN = "load-benchmark-token"
GB = 10**9
#: Seconds over which an idle population's cost is measured, at least.
IDLE_SECONDS = 40.0
#: comind_updates_total results that must stay at 0.
REFUSED = tuple(result for result in UPDATE_RESULTS if result != "accepted")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    model_bytes: int
    warmup_rounds: int
    measured_rounds: int
    processes: int  # load-generator processes the clients are spread over
    clients_per_round: int | None = None  # --clients-per-round; None: every worker, every round
    encoding: str = "float32"  # --update-encoding
    # Targets; None: none.
    max_cpu_per_round: float | None = None  # ps CPU seconds per measured round
    max_p50: float | None = None            # round seconds
    max_p99: float | None = None
    max_rss_bytes: int = 1 * GB
    lease_seconds: float = 10.0             # --lease-seconds (the ps's default)
    long_poll_seconds: float = LONG_POLL_SECONDS  # --long-poll-seconds
    idle_window: float | None = None        # seconds; None: see idle_seconds

    @property
    def idle_seconds(self) -> float:
        """With sampling, the window over which the waiting population's cost is measured: a lease and a long
        poll at least, so that it holds each worker's renewals and calls as often as any other such stretch."""
        return self.idle_window or max(IDLE_SECONDS, self.lease_seconds, self.long_poll_seconds)

    @property
    def sampled(self) -> bool:
        return self.clients_per_round is not None

    @property
    def per_round(self) -> int:
        """The updates each round takes."""
        return self.clients if self.clients_per_round is None else min(self.clients_per_round, self.clients)

    @property
    def last_measured(self) -> int:
        return self.warmup_rounds + self.measured_rounds

    @property
    def rounds(self) -> int:
        """With sampling, one more than measured: the final one sends its model to every worker."""
        return self.last_measured + self.sampled

    @property
    def timeout(self) -> float:
        """Seconds the whole run may take before it is declared hung."""
        joins = self.clients / 50 + (self.idle_seconds if self.sampled else 0)
        return 120 + joins + self.rounds * (5 + self.per_round * self.model_bytes / 200e6) \
            + self.clients * self.model_bytes / 200e6

    def flags(self) -> list[str]:
        """The ps's flags for it."""
        sampling = ["--clients-per-round", str(self.clients_per_round)] if self.sampled else []
        return [*sampling, "--update-encoding", self.encoding, "--lease-seconds", f"{self.lease_seconds:g}",
                "--long-poll-seconds", f"{self.long_poll_seconds:g}"]


def scenarios(quick: bool) -> tuple[Scenario, ...]:
    warmup, measured, large = (2, 8, 3) if quick else (3, 30, 10)
    return (Scenario("1,000 workers x 0.4 MB, all selected", 1000, 400_000, warmup, measured, processes=4,
                     max_cpu_per_round=0.5),
            # 30 s leases: with 10 s ones, each generator process (2,500 clients on a share of 2 cores) fell
            # behind its clients' renewals, every 3.3 s, and their leases lapsed. 8 processes: 1,250 clients on
            # each event loop.
            Scenario("10,000 workers x 0.4 MB, 100 per round", 10_000, 400_000, warmup, measured, processes=8,
                     clients_per_round=100, max_p50=0.5, max_rss_bytes=1500 * MB, lease_seconds=30.0),
            Scenario("64 workers x 10 MB", 64, 10 * MB, 1 + quick, large, processes=4, max_p99=1.0),
            Scenario("64 workers x 10 MB, int8 updates", 64, 10 * MB, 1 + quick, large, processes=4,
                     encoding="int8", max_p99=1.0))


@dataclasses.dataclass(frozen=True)
class LoadRun:
    scenario: Scenario
    round_seconds: np.ndarray  # per measured round: first push until the last worker its model goes to holds it
    sync_seconds: np.ndarray   # per worker and measured round: its push until it holds the round's model
    push_seconds: np.ndarray   # per worker and measured round: its push until the ps's receipt for it
    rounds_complete: set[int]  # the rounds that took all the updates they asked for
    finished: int              # workers that received the final model
    errors: list[str]          # what workers saw go wrong, one line each
    recalls: dict[str, int]    # Round calls made again (swarm.py), by the status that ended the one before
    join_retries: int          # Joins made again after the ps said to retry (busy, or its registration rate)
    updates: dict[str, float]  # comind_updates_total by result, over the whole run
    ps_round_counts: dict[float, float]  # comind_round_duration_seconds buckets (le -> count), measured rounds
    ps_peak_bytes: int
    ps_cpu_seconds: float      # while the measured rounds ran
    swarm_cpu_seconds: float   # the load generators, likewise
    measured_wall_seconds: float
    ps_exit_status: int
    load_average: float           # 1-minute, when the run started
    idle_cpu_seconds: float | None  # with sampling: the ps's, while every worker but the chief waited idle
    idle_wall_seconds: float
    floor_ms_per_call: float = math.nan  # grpc_floor.py: a bare grpc.aio server's CPU for one such call


# Reading the ps ---------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # the name may hold spaces; it ends at the last ')'
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round_buckets(scrape: Scrape) -> dict[float, float]:
    """comind_round_duration_seconds as {bucket bound: rounds that took at most that long}."""
    return {float(dict(labels)["le"]): value for (name, labels), value in scrape.samples.items()
            if name == "comind_round_duration_seconds_bucket"}


# A run ------------------------------------------------------------------------------


def start_swarms(scenario: Scenario, address: str) -> list[subprocess.Popen]:
    bounds = np.linspace(0, scenario.clients, scenario.processes + 1).astype(int)
    env = {**os.environ, "COMIND_TOKEN": TOKEN}
    hold = ["--hold-initial"] if scenario.sampled else []
    return [subprocess.Popen([sys.executable, str(SWARM), "--address", address, "--tasks", f"{start}:{stop}",
                              "--model-bytes", str(scenario.model_bytes), "--rounds", str(scenario.rounds),
                              *(hold if start == 0 else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            for start, stop in itertools.pairwise(bounds)]


def measure_idle(scenario: Scenario, ps, port: int, chief: subprocess.Popen) -> tuple[float, float]:
    """The ps's CPU seconds over a window in which every worker has joined and all but the chief wait in their
    Round calls for a model (the chief holds it back), and the window's length; then releases the chief."""
    deadline = time.monotonic() + scenario.timeout
    while Scrape(port)("comind_workers") < scenario.clients:
        if time.monotonic() > deadline or ps.proc.poll() is not None:
            raise RuntimeError(f"The workers did not all join; ps log:\n{ps.log()}")
        time.sleep(0.5)
    time.sleep(2)  # the last joiners' first calls
    cpu, started = cpu_seconds(ps.proc.pid), time.monotonic()
    time.sleep(scenario.idle_seconds)
    idle = cpu_seconds(ps.proc.pid) - cpu, time.monotonic() - started
    assert chief.stdin is not None
    chief.stdin.write("init\n")
    chief.stdin.flush()
    return idle


def run_load(scenario: Scenario) -> LoadRun:
    """Runs a fresh ps and the scenario's swarm until every round is done and every worker left."""
    load_average = os.getloadavg()[0]
    port = free_port()
    ps = start_ps("--num-workers", str(scenario.clients), "--rounds", str(scenario.rounds), "--exit-grace", "30",
                  "--metrics-port", str(port), "--token", TOKEN, *scenario.flags())
    swarms: list[subprocess.Popen] = []
    idle: tuple[float | None, float] = (None, 0.0)
    pool = concurrent.futures.ThreadPoolExecutor(scenario.processes)
    try:
        swarms = start_swarms(scenario, ps.address)
        lines = [pool.submit(swarm.stdout.readline) for swarm in swarms]
        if scenario.sampled:
            idle = measure_idle(scenario, ps, port, swarms[0])
        # The ps logs each round as it publishes it: the measured rounds are those between two lines.
        ps.wait_for(rf"Round {scenario.warmup_rounds}/{scenario.rounds}: ", timeout=scenario.timeout)
        before = Scrape(port)
        cpu_before = cpu_seconds(ps.proc.pid), sum(cpu_seconds(swarm.pid) for swarm in swarms)
        started = time.monotonic()
        ps.wait_for(rf"Round {scenario.last_measured}/{scenario.rounds}: ", timeout=scenario.timeout)
        wall = time.monotonic() - started
        ps_cpu = cpu_seconds(ps.proc.pid) - cpu_before[0]
        swarm_cpu = sum(cpu_seconds(swarm.pid) for swarm in swarms) - cpu_before[1]
        measured = Scrape(port)
        reports = [report for line in lines for report in _parse(line.result(timeout=scenario.timeout), ps)]
        # Every round is over and every worker is still registered: the ps is
        # alive, so its high-water mark and counters are final.
        peak = proc_status_kib(ps.proc.pid, "VmHWM") * 1024
        after = Scrape(port)
        for swarm in swarms:
            swarm.communicate("go\n", timeout=60)
        status = ps.wait(timeout=60)
    finally:
        for swarm in swarms:
            if swarm.poll() is None:
                swarm.kill()
        pool.shutdown()  # its reads end with the swarms
        ps.stop()
    updates = {result: after("comind_updates_total", result=result) for result in UPDATE_RESULTS}
    buckets = {le: count - round_buckets(before)[le] for le, count in round_buckets(measured).items()}
    return LoadRun(scenario, **_client_view(reports, scenario), updates=updates, ps_round_counts=buckets,
                   ps_peak_bytes=peak, ps_cpu_seconds=ps_cpu, swarm_cpu_seconds=swarm_cpu,
                   measured_wall_seconds=wall, ps_exit_status=status, load_average=load_average,
                   idle_cpu_seconds=idle[0], idle_wall_seconds=idle[1])


def _parse(line: str, ps) -> list[dict]:
    if not line:
        raise RuntimeError(f"A swarm process ended without a report; ps log:\n{ps.log()}")
    return json.loads(line)


def _client_view(reports: list[dict], scenario: Scenario) -> dict:
    """The LoadRun fields that come from the workers' reports (swarm.py's Push and Received rows)."""
    round, pushed, acked = np.array([p for r in reports for p in r["pushes"]]).reshape(-1, 3).T
    model_round, received = np.array([m for r in reports for m in r["models"]]).reshape(-1, 2).T
    measured = range(scenario.warmup_rounds + 1, scenario.last_measured + 1)
    per_round = [received[model_round == r].max() - pushed[round == r].min() for r in measured
                 if (round == r).any() and (model_round == r).any()]
    # A worker's push for round r, and when it held round r's model, if it received that one.
    held = {(r["task"], m[0]): m[1] for r in reports for m in r["models"]}
    tasks = np.array([r["task"] for r in reports for _ in r["pushes"]], dtype=int)
    sync = [held[task, r] - p for task, r, p in zip(tasks, round, pushed, strict=True)
            if r in measured and (task, r) in held]
    in_measured = np.isin(round, measured)
    return {
        "round_seconds": np.array(per_round),
        "sync_seconds": np.array(sync),
        "push_seconds": (acked - pushed)[in_measured],
        "rounds_complete": {int(r) for r in np.unique(round) if (round == r).sum() == scenario.per_round},
        "finished": sum(1 for r in reports if r["models"] and r["models"][-1][0] == scenario.rounds),
        "errors": [f"worker {r['task']}: {r['error']}" for r in reports if r["error"]],
        "recalls": dict(sum((collections.Counter(r["recalls"]) for r in reports), collections.Counter())),
        "join_retries": sum(r["join_retries"] for r in reports),
    }


# Report -----------------------------------------------------------------------------


def percentiles(seconds: np.ndarray) -> str:
    if not len(seconds):
        return "no rounds"
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99])
    return f"p50 {p50:6.3f}  p90 {p90:6.3f}  p99 {p99:6.3f}  max {seconds.max():6.3f} s  (n={len(seconds)})"


def bucket_bound(counts: dict[float, float], quantile: float) -> str:
    """The smallest histogram bucket that holds ``quantile`` of the observations."""
    total = counts.get(float("inf"), 0)
    for le, count in sorted(counts.items()):
        if total and count >= quantile * total:
            return f"<= {le:g} s"
    return "no rounds"


def _quantile(seconds: np.ndarray, q: float) -> float:
    return float(np.percentile(seconds, q)) if len(seconds) else float("inf")


def idle_ms_per_worker_minute(run: LoadRun) -> float | None:
    """The ps's CPU milliseconds per idle worker per minute (every worker but the chief waited)."""
    if run.idle_cpu_seconds is None:
        return None
    return run.idle_cpu_seconds * 1e3 / (run.scenario.clients - 1) / (run.idle_wall_seconds / 60)


def summary(run: LoadRun) -> dict:
    """The run's JSON line."""
    s = run.scenario
    idle = idle_ms_per_worker_minute(run)
    return {"workers": s.clients, "clients_per_round": s.per_round, "model_bytes": s.model_bytes,
            "update_encoding": s.encoding, "rounds": s.measured_rounds,
            "ps_cpu_s_per_round": round(run.ps_cpu_seconds / s.measured_rounds, 3),
            "round_p50_s": round(_quantile(run.round_seconds, 50), 3),
            "round_p99_s": round(_quantile(run.round_seconds, 99), 3),
            "ps_peak_rss_mb": round(run.ps_peak_bytes / MB), "refused": int(sum(run.updates[r] for r in REFUSED)),
            "generators_cpu_share": round(run.swarm_cpu_seconds / (run.ps_cpu_seconds + run.swarm_cpu_seconds), 3),
            "idle_ps_cpu_ms_per_worker_minute": None if idle is None else round(idle, 4),
            "grpc_floor_ms_per_call": round(run.floor_ms_per_call, 3) if math.isfinite(run.floor_ms_per_call)
            else None,
            "load_average_at_start": round(run.load_average, 2)}


def _target(row: Row, value: float, limit: float | None, unit: str, what: str = "") -> Row:
    if limit is None:
        return row
    return dataclasses.replace(row, target=f"{what}<= {limit:g} {unit}", passed=value <= limit)


def section(run: LoadRun) -> Section:
    s = run.scenario
    goes_to = "the next round's selected workers hold it" if s.sampled else "every worker holds it"
    round_row = Row(f"round: first push -> {goes_to}", percentiles(run.round_seconds))
    round_row = _target(round_row, _quantile(run.round_seconds, 50), s.max_p50, "s", "p50 ")
    round_row = _target(round_row, _quantile(run.round_seconds, 99), s.max_p99, "s", "p99 ")
    histogram = run.ps_round_counts
    updates = s.per_round * s.rounds
    refused = [run.updates[result] for result in REFUSED]
    complete = run.rounds_complete >= set(range(1, s.rounds + 1)) and run.finished == s.clients
    cores = len(os.sched_getaffinity(0))
    floor = (run.ps_cpu_seconds + run.swarm_cpu_seconds) / s.measured_rounds / cores
    cpu_per_round = run.ps_cpu_seconds / s.measured_rounds
    swarm_share = run.swarm_cpu_seconds / (run.measured_wall_seconds * cores)
    sync = "it holds the round's model" + (" (if selected again)" if s.sampled else "")
    rows = [
        round_row,
        Row(f"sync: a worker's push -> {sync}", percentiles(run.sync_seconds)),
        Row("  of which its push, until the ps acknowledged it", percentiles(run.push_seconds)),
        Row("ps comind_round_duration_seconds", f"p50 {bucket_bound(histogram, 0.5)}   p99 "
            f"{bucket_bound(histogram, 0.99)}   (buckets, n={histogram.get(float('inf'), 0):.0f})"),
        Row("ps peak RSS (VmHWM)", f"{run.ps_peak_bytes / MB:.0f} MB", f"<= {s.max_rss_bytes / MB:.0f} MB",
            run.ps_peak_bytes <= s.max_rss_bytes),
        _target(Row("ps CPU, measured rounds", f"{run.ps_cpu_seconds:.1f} s in {run.measured_wall_seconds:.1f} s "
                    f"wall ({run.ps_cpu_seconds / run.measured_wall_seconds:.0%} of a core), "
                    f"{cpu_per_round * 1e3:.0f} ms per round"), cpu_per_round, s.max_cpu_per_round, "s"),
        Row("  a bare grpc.aio server, the same calls (grpc_floor.py)",
            f"{run.floor_ms_per_call:.2f} ms per call, so {run.floor_ms_per_call * s.per_round / 1e3:.2f} s per "
            f"round: the ps's own code is the rest" if math.isfinite(run.floor_ms_per_call) else "not measured"),
        Row("load generators' CPU, likewise", f"{run.swarm_cpu_seconds:.1f} s ({s.processes} processes), "
            f"{swarm_share:.0%} of the {cores} cores"),
        # Both share this machine's cores: no round can be shorter than this.
        Row("  so a round needs at least", f"{floor:.2f} s of {cores} cores' time"),
        *([Row("ps CPU per idle worker per minute",
               f"{idle_ms_per_worker_minute(run):.3f} ms ({run.idle_cpu_seconds:.1f} s over "
               f"{run.idle_wall_seconds:.0f} s, {s.clients - 1} workers waiting)")] if s.sampled else []),
        Row("updates accepted", f"{run.updates['accepted']:.0f} of {updates}", "all",
            run.updates["accepted"] == updates),
        Row(f"updates {' / '.join(REFUSED)}", " / ".join(f"{count:.0f}" for count in refused), "0",
            not any(refused)),
        Row("worker errors; every round complete, final model to all",
            f"{len(run.errors)}; {'yes' if complete else 'NO'}", "0; yes",
            not run.errors and complete and run.ps_exit_status == 0),
    ]
    final = ", + the final round (its model to every worker)" if s.sampled else ""
    notes = (f"{s.clients} workers in {s.processes} processes, each with its own connection; {s.per_round} per "
             f"round, {s.encoding} updates, {s.lease_seconds:g} s leases, {s.long_poll_seconds:g} s long polls; "
             f"{s.warmup_rounds} warm-up + "
             f"{s.measured_rounds} measured rounds{final}; load average {run.load_average:.2f} at the start.",
             *([f"{sum(run.recalls.values())} Round calls made again, by the status that ended the one before "
                f"({', '.join(f'{code} {n}' for code, n in sorted(run.recalls.items()))}): INTERNAL when a renewal "
                f"met the call's end (grpc.aio), the others as a WorkerClient retries them."] if run.recalls else []),
             *([f"{run.join_retries} Joins made again after the ps said to retry."] if run.join_retries else []),
             *run.errors[:5])
    return Section(f"{s.name}", rows, notes)


def floor_ms_per_call(scenario: Scenario) -> float:
    """What a bare grpc.aio server's CPU costs per Round call of ``scenario``'s bytes, after its run."""
    layout = Layout.of(make_model(scenario.model_bytes))
    update_bytes = encodings.parse(scenario.encoding).wire_layout(layout).nbytes
    progress(f"  the bare gRPC floor of its calls (load average {os.getloadavg()[0]:.2f})")
    return grpc_floor.ms_per_call(update_bytes, layout.nbytes, min(scenario.per_round * 10, 1000))


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, help="workers in the first scenario, instead of 1,000 (a smaller "
                        "machine, a smoke test); its targets still apply")
    parser.add_argument("--population", type=int, help="connected workers in the sampled scenario, instead of "
                        "10,000 (a machine that cannot hold that many clients)")
    parser.add_argument("--long-poll-seconds", type=float, help="the ps's long poll in the sampled scenario, "
                        f"instead of its default, {LONG_POLL_SECONDS:g} s (what waiting workers cost it)")
    parser.add_argument("--only", action="append", help="run only the scenarios whose name starts with this "
                        "(repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(__doc__, RESULTS, argv, add_flags)
    chosen = list(scenarios(flags.quick))
    for index, count in ((0, flags.workers), (1, flags.population)):
        if count is not None:  # a scenario with fewer (or more) workers
            first = chosen[index]
            name = first.name.replace(f"{first.clients:,}", f"{count:,}")
            chosen[index] = dataclasses.replace(first, name=name, clients=count)
    if flags.long_poll_seconds is not None:
        chosen[1] = dataclasses.replace(chosen[1], long_poll_seconds=flags.long_poll_seconds)
    if flags.only:  # by the scenarios' own names, before --workers and --population
        chosen = [s for s, default in zip(chosen, scenarios(flags.quick), strict=True)
                  if any(default.name.startswith(prefix) for prefix in flags.only)]
    started = time.perf_counter()
    header = ["coMind load benchmark", *machine_facts(), f"run       {'quick' if flags.quick else 'full'}"]
    runs = []
    for scenario in chosen:
        progress(f"{scenario.name} (load average {os.getloadavg()[0]:.2f})")
        runs.append(dataclasses.replace(run_load(scenario), floor_ms_per_call=floor_ms_per_call(scenario)))
    write_report(header, [section(run) for run in runs], started, flags.output,
                 [json.dumps(summary(run)) for run in runs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
