"""Core performance figures of coMind: barrier latency, aggregation throughput, ps memory.

What it measures, each against a target (PASS/MISS):

1. Barrier latency: from the moment the last worker's update is acknowledged
   until every worker holds the new global model, per round, with a real
   ``comind ps`` process and ``WorkerClient`` workers in separate processes
   that sync with no training in between (a zero change each round). The
   ps acknowledges an update with its receipt, in the same Round call that
   then carries the new model down.
2. Aggregation throughput: ``RunningWeightedSum.add`` against a plain NumPy
   ``a += b`` over the same bytes, and the whole ps-side ingest path without
   gRPC (``Assembler`` with the finite check, then ``add``).
3. Peak ps memory (VmHWM) with 1, 8 and 64 workers pushing a 10 MB model.

Run it from the repository root (about a minute on 2 cores; ``--quick`` is
a shorter, noisier run). Other load on the machine shows in the figures, so
the report prints the load average it started under:

    .venv/bin/python bench/core.py [--quick]

It prints a table and writes the same text to ``bench/results/core.txt``.
Progress goes to stderr. MB and GB are decimal (10**6, 10**9 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from comind import WorkerClient
from comind.aggregation import RunningWeightedSum
from comind.tensors import Assembler, Layout, chunks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "core.txt"
MB = 10**6
GB = 10**9
#: Every update counts this many examples, so the ps takes the weighted path
#: (weight != 1.0) that real training takes.
EXAMPLES = 123
#: Seconds a fleet of workers may take before the run is declared hung.
FLEET_TIMEOUT = 300.0


@dataclasses.dataclass(frozen=True)
class Settings:
    warmup_rounds: int
    small_rounds: int    # measured rounds with the 0.4 MB model
    large_rounds: int    # measured rounds with the 100 MB model
    memory_rounds: int
    repeats: int         # repetitions of each throughput timing


FULL = Settings(warmup_rounds=5, small_rounds=100, large_rounds=20, memory_rounds=3, repeats=7)
QUICK = Settings(warmup_rounds=2, small_rounds=15, large_rounds=3, memory_rounds=2, repeats=3)


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    value: str
    target: str = ""
    passed: bool | None = None  # None: a figure for context, with no target

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "MISS")


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    rows: list[Row]
    notes: tuple[str, ...] = ()


# The model ---------------------------------------------------------------------


def make_model(nbytes: int) -> list[np.ndarray]:
    """A float32 model of about ``nbytes``: three kernels of uneven size and a bias.

    The same in every process (fixed seed), so workers build it themselves
    instead of receiving 100 MB through a pipe.
    """
    elements = nbytes // 4
    kernels = [(n // 64, 64) for n in (elements // 2, elements // 4, elements // 8)]
    bias = elements - sum(rows * cols for rows, cols in kernels)
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in [*kernels, (bias,)]]


# Workers (run in spawned processes) ---------------------------------------------


class TimedClient(WorkerClient):
    """A WorkerClient that records when the ps's receipt for its last update arrived.

    ``sync`` sends the update and receives the new model in one Round call;
    the barrier measure needs the moment between the two, the receipt, which
    only the call's replies show: this wraps the stub's ``Round``.
    """

    acked_at: float | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        round_call = self._stub.Round
        self._stub.Round = lambda requests, **options: _Receipts(round_call(requests, **options), self)


class _Receipts:
    """A Round call's replies, passed on as they are; a receipt sets its client's ``acked_at``."""

    def __init__(self, replies, client: TimedClient):
        self._replies, self._client = replies, client

    def __iter__(self):
        return self

    def __next__(self):
        message = next(self._replies)
        if message.HasField("receipt"):
            self._client.acked_at = time.perf_counter()
        return message

    def cancel(self) -> bool:
        return self._replies.cancel()


@dataclasses.dataclass(frozen=True)
class RoundTiming:
    round: int
    acked: float     # perf_counter() when the ps's receipt for the update arrived
    returned: float  # perf_counter() when sync() returned the new model


def run_client(address: str, task_index: int, weights: list[np.ndarray],
               rounds: int) -> tuple[TimedClient, list[RoundTiming]]:
    """Joins, then syncs ``rounds`` times back to back; the client stays open."""
    client = TimedClient(address, task_index=task_index, description=f"bench {task_index}")
    client.join(weights)
    timings = []
    for _ in range(rounds):
        client.acked_at = None
        state = client.sync(weights, num_examples=EXAMPLES)
        returned = time.perf_counter()
        if client.acked_at is None:  # sync() found the ps restarted and did not send the update
            raise RuntimeError(f"Worker {task_index} got no receipt for round {state.round}; see the ps log.")
        timings.append(RoundTiming(state.round, client.acked_at, returned))
    return client, timings


def client_process(address: str, task_indices: Sequence[int], model_bytes: int, rounds: int,
                   results, release, run: Callable = run_client) -> None:
    """One worker process: a thread per task index, all sharing one copy of the weights.

    It reports its timings (``run``'s, for each worker), then keeps its
    workers registered until ``release`` is set, so that the ps is still
    alive (and its peak memory readable) when the parent looks.
    """
    clients = []
    try:
        weights = make_model(model_bytes)
        with ThreadPoolExecutor(len(task_indices)) as pool:
            futures = [pool.submit(run, address, task, weights, rounds) for task in task_indices]
            outcomes = [future.result() for future in futures]
        clients = [client for client, _ in outcomes]
        results.put(("ok", [timing for _, timings in outcomes for timing in timings]))
        release.wait(FLEET_TIMEOUT)
    except Exception:  # noqa: BLE001 - the parent must hear of any failure, or it waits forever
        results.put(("error", traceback.format_exc()))
    finally:
        for client in clients:
            client.close()


# The ps and a fleet of workers (run in this process) -------------------------------


def start_ps(*args: str):
    """A ``comind ps`` subprocess on a free loopback port, via the tests' launcher.

    Imported here rather than at the top, so that the spawned worker
    processes (which re-import this file) do not load pytest.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from processes import PsProcess

    return PsProcess(["--metrics-port", "0", *args])


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, such as VmHWM (peak RSS) or VmRSS."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} is not in /proc/{pid}/status")


@dataclasses.dataclass(frozen=True)
class FleetRun:
    timings: list[RoundTiming]
    ps_peak_bytes: int


def run_fleet(model_bytes: int, clients: int, processes: int, rounds: int) -> FleetRun:
    """Runs a fresh ps and ``clients`` workers spread over ``processes`` processes for ``rounds`` rounds."""
    ps = start_ps("--rounds", str(rounds), "--num-workers", str(clients), "--exit-grace", "5")
    context = multiprocessing.get_context("spawn")
    results, release = context.Queue(), context.Event()
    # Task 0 (the chief, which provides the initial model) lands in the first process.
    workers = [context.Process(target=client_process, daemon=True,
                               args=(ps.address, range(clients)[i::processes], model_bytes, rounds, results, release))
               for i in range(processes)]
    try:
        for worker in workers:
            worker.start()
        timings = []
        for _ in workers:
            status, payload = results.get(timeout=FLEET_TIMEOUT)
            if status != "ok":
                raise RuntimeError(f"A worker process failed:\n{payload}\nps log:\n{ps.log()}")
            timings.extend(payload)
        # Every round is over and every worker is still registered: the ps is
        # alive and waiting for them to leave, so its high-water mark is final.
        peak = proc_status_kib(ps.proc.pid, "VmHWM") * 1024
        release.set()
        for worker in workers:
            worker.join(timeout=30)
        ps.wait(timeout=30)
        return FleetRun(timings, peak)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        ps.stop()


# 1. Barrier latency ---------------------------------------------------------------


def barrier_latencies(timings: Sequence[RoundTiming], first_round: int) -> list[float]:
    """Per round from ``first_round`` on: last model received minus last push acknowledged."""
    by_round: dict[int, list[RoundTiming]] = {}
    for timing in timings:
        by_round.setdefault(timing.round, []).append(timing)
    return [max(t.returned for t in group) - max(t.acked for t in group)
            for round, group in sorted(by_round.items()) if round >= first_round]


def measure_barrier(label: str, model_bytes: int, clients: int, measured_rounds: int, settings: Settings,
                    target_ms: float | None) -> Row:
    progress(f"barrier: {label}")
    rounds = settings.warmup_rounds + measured_rounds
    run = run_fleet(model_bytes, clients, processes=clients, rounds=rounds)
    latencies_ms = np.array(barrier_latencies(run.timings, settings.warmup_rounds + 1)) * 1e3
    median, p90 = np.median(latencies_ms), np.percentile(latencies_ms, 90)
    value = f"median {median:7.2f} ms   p90 {p90:7.2f} ms   ({len(latencies_ms)} rounds)"
    if target_ms is None:
        return Row(label, value)
    return Row(label, value, f"median <= {target_ms:g} ms", bool(median <= target_ms))


def barrier_section(settings: Settings) -> Section:
    small, large = 400_000, 100 * MB
    rows = [
        measure_barrier("0.4 MB model, 2 clients", small, 2, settings.small_rounds, settings, target_ms=1),
        measure_barrier("0.4 MB model, 8 clients", small, 8, settings.small_rounds, settings, target_ms=4),
        # gRPC loopback streaming moves about 3.5 GB/s: about 60 ms is the floor.
        measure_barrier("100 MB model, 2 clients", large, 2, settings.large_rounds, settings, target_ms=80),
    ]
    return Section("1. Barrier latency (last push acknowledged -> every worker holds the new model)", rows, (
        "Each client is its own process. The ps sends the receipt for the last update only after it has",
        "averaged and published the round, so this is the time to hand the new model to every worker,",
        "not the time to average it.",
    ))


# 2. Aggregation throughput -----------------------------------------------------------


def median_seconds(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``function`` after one untimed call (first-touch page faults, caches)."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def aggregation_section(settings: Settings) -> Section:
    progress("aggregation throughput")
    weights = make_model(100 * MB)
    layout = Layout.of(weights)
    packed = layout.pack(weights)
    nbytes = layout.nbytes
    tensors = layout.views(packed)
    running = RunningWeightedSum(layout)
    # The bytes a ps receives exist before it assembles them: slice them outside the timing.
    received = list(chunks(packed))
    total = np.zeros(nbytes // 4, np.float32)
    flat = packed.view(np.float32)

    def plain_add() -> None:
        np.add(total, flat, out=total)  # what `total += flat` runs

    def weighted_add() -> None:
        running.add(tensors, float(EXAMPLES))

    reused = np.empty(nbytes, np.uint8)

    def assemble() -> np.ndarray:
        assembler = Assembler(layout, check_finite=True, buffer=reused)
        for data in received:
            assembler.feed(data)
        return assembler.finish()

    def ingest() -> None:
        running.add(layout.views(assemble()), float(EXAMPLES))

    rate = {name: nbytes / median_seconds(function, settings.repeats) / GB
            for name, function in [("+=", plain_add), ("add", weighted_add), ("assemble", assemble),
                                   ("ingest", ingest)]}
    ratio = rate["add"] / rate["+="]
    size = f"{nbytes / MB:.0f} MB"
    rows = [
        Row(f"NumPy a += b, float32, {size}", f"{rate['+=']:6.2f} GB/s"),
        Row(f"RunningWeightedSum.add, weight {EXAMPLES}, {size}", f"{rate['add']:6.2f} GB/s"),
        Row("add / +=", f"{ratio:6.2f}", ">= 0.50", bool(ratio >= 0.5)),
        Row("ps ingest: Assembler(check_finite) + add", f"{rate['ingest']:6.2f} GB/s"),
        Row("  of which Assembler alone (1 MiB chunks)", f"{rate['assemble']:6.2f} GB/s"),
    ]
    return Section(f"2. Aggregation throughput (GB/s of update bytes, median of {settings.repeats})", rows, (
        "Ingest reuses one receive buffer, as the ps does (it keeps one per receive slot).",
    ))


# 3. Peak ps memory -------------------------------------------------------------------


def ps_baseline_bytes() -> int:
    """Resident memory of an idle ps that holds no model."""
    ps = start_ps("--rounds", "1", "--num-workers", "1")
    try:
        time.sleep(1.0)  # let the server threads settle after "Listening"
        return proc_status_kib(ps.proc.pid, "VmRSS") * 1024
    finally:
        ps.stop()


def memory_section(settings: Settings) -> Section:
    model_bytes = 10 * MB
    limit = 4 * model_bytes + 200 * MB
    progress("memory: idle ps")
    rows = [Row("ps RSS, idle, no model", f"{ps_baseline_bytes() / MB:6.1f} MB")]
    peaks = {}
    for clients in (1, 8, 64):
        # 8 processes at most: 64 worker processes would swamp 2 cores; the rest run as threads.
        processes = min(clients, 8)
        fleet = f"{clients} client{'s' if clients > 1 else ''} ({processes} proc x {clients // processes} thr)"
        progress(f"memory: {fleet}")
        run = run_fleet(model_bytes, clients, processes, rounds=settings.memory_rounds)
        peaks[clients] = run.ps_peak_bytes
        rows.append(Row(f"ps peak RSS, 10 MB model, {fleet}", f"{run.ps_peak_bytes / MB:6.1f} MB",
                        f"<= {limit / MB:.0f} MB", run.ps_peak_bytes <= limit))
    # Flat: memory must not grow as model x clients. Buffering each waiting
    # update would add a whole model per client; a connection's own gRPC
    # buffers (about a megabyte) may stay, so allow a quarter model each.
    per_client = (peaks[64] - peaks[1]) / 63
    rows.append(Row("growth per extra client, 1 -> 64", f"{per_client / MB:6.2f} MB",
                    f"<= {model_bytes / 4 / MB:.1f} MB (flat)", per_client <= model_bytes / 4))
    return Section(f"3. Peak ps memory (VmHWM, fresh ps per row, {settings.memory_rounds} rounds)", rows, (
        "Limit: 4 x model + 200 MB. VmHWM is read after the last round, while the workers are still",
        "registered, so it covers joining, every push and every pull.",
    ))


# Report --------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def machine_facts() -> list[str]:
    """Date, machine, software and load average: read them before a run loads the machine."""
    return [
        f"date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine   nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        f"software  python {platform.python_version()}, numpy {np.__version__}, grpcio {grpc.__version__}",
        f"load      {' '.join(f'{load:.2f}' for load in os.getloadavg())} (1/5/15 min, at the start)",
    ]


def render(section: Section) -> list[str]:
    rows = section.rows
    widths = [max(len(getattr(row, field)) for row in rows) for field in ("name", "value", "target")]
    lines = ["", section.title, "-" * len(section.title)]
    for row in rows:
        cells = (row.name.ljust(widths[0]), row.value.ljust(widths[1]), row.target.ljust(widths[2]), row.verdict)
        lines.append("  ".join(cells).rstrip())
    return lines + [f"  {note}" for note in section.notes]


def write_report(header: list[str], sections: Sequence[Section], started: float, output: Path,
                 trailer: Sequence[str] = ()) -> None:
    """Prints the header, the sections, how many targets they met and the ``trailer`` lines (a benchmark's
    JSON), and writes the same to ``output``."""
    lines = list(header)
    for section in sections:
        lines += render(section)
    verdicts = [row.passed for section in sections for row in section.rows if row.passed is not None]
    lines += ["", f"{verdicts.count(True)} of {len(verdicts)} targets met; "
                  f"run took {time.perf_counter() - started:.0f} s.", *trailer]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


def parse_flags(doc: str, results: Path, argv: Sequence[str] | None,
                add_flags: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The flags every benchmark here takes: --quick, and --output for the report; ``add_flags`` adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats (noisier)")
    parser.add_argument("--output", type=Path, default=results, help=f"where to write the report [{results}]")
    if add_flags:
        add_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    flags = parse_flags(__doc__, RESULTS, argv)
    settings = QUICK if flags.quick else FULL
    started = time.perf_counter()
    mode = "quick" if settings == QUICK else "full"
    lines = ["coMind core benchmark", *machine_facts(),
             f"run       {mode}: {settings.warmup_rounds} warm-up rounds, {settings.repeats} repeats per throughput"]
    sections = [barrier_section(settings), aggregation_section(settings), memory_section(settings)]
    write_report(lines, sections, started, flags.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
