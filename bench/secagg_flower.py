"""coMind's secure aggregation side by side with Flower 1.42's SecAgg+: time and bytes per round, on this machine.

Both systems run bench/secagg.py's task: W workers each change every value of a float32 model by the same small
amount a round (no training), with secure aggregation and without, and the server averages the changes.

* coMind: bench/secagg.py's own run (a ``comind ps`` process, ``WorkerClient`` workers), its bytes the ps's counts
  by stage (``comind_secagg_bytes_total``, ``comind_update_bytes_total``): the protocol's messages, without gRPC's
  framing.
* Flower 1.42.0 in its deployment mode, on its legacy path (``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
  in the ServerApp, ``secaggplus_mod`` in the ClientApp: bench/vs_flower/secagg_app), on bench/flower.py's
  SuperLink, SuperNodes and settings. Its bytes: a ClientApp mod's count of each message's objects as the
  SuperNode pulls and pushes them (deflated; without gRPC's framing, object IDs and the object tree).

Settings as alike as the two allow: every party shares its secrets with every other (Flower: num_shares 1.0;
coMind: all neighbours up to 20 parties), the smallest majority rebuilds them (t = W // 2 + 1), values clipped to
[-4, 4], masks and sums in Z_{2^32}, stochastic rounding to about 2^32 / W levels (coMind) or 2^32 / 2W (Flower:
its n-fold sum must stay below the modulus). Flower's clients send the change (a delta, as coMind's workers do),
so its clipping range bounds updates, not weights, as coMind's does.

Each repeat runs every configuration on both systems, alternating which goes first, so that drift in the machine's
load hits both; the report shows medians over the repeats (a ratio: the median of each repeat's own ratio).

    .venv/bin/python bench/secagg_flower.py [--quick] [--repeats N]

It prints a table and writes the same text to ``bench/results/secagg_flower.txt``. Flower runs from
bench/.venv-flower, which the first run creates (bench/setup-flower). MB are decimal (10**6 bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median
from typing import Any

import secagg
from comind.secagg.config import DEFAULT_CLIP_RANGE
from core import MB, ROOT, Row, Section, machine_facts, make_model, parse_flags, write_report
from vs_flower import flower_secagg, flower_side

RESULTS = ROOT / "bench" / "results" / "secagg_flower.txt"
#: coMind's rounds a run (the first not measured): its rounds take milliseconds, Flower's seconds.
COMIND_ROUNDS = 11


@dataclasses.dataclass(frozen=True)
class Config:
    workers: int
    model_bytes: int
    flower_rounds: int  # the first is not measured (start-up)

    @property
    def comind(self) -> secagg.Case:
        return secagg.Case(self.workers, self.model_bytes, COMIND_ROUNDS, processes=min(self.workers, 4))

    @property
    def name(self) -> str:
        return f"{self.workers} workers, {self.model_bytes / MB:g} MB"


FULL = [Config(2, 400_000, 4), Config(8, 400_000, 4), Config(2, 10 * MB, 3)]
QUICK = [Config(2, 400_000, 3), Config(8, 400_000, 3)]


SYSTEMS = ("coMind", "Flower")
#: One configuration's runs, by system and mode (secure or not), one a repeat.
Runs = dict[tuple[str, bool], list]


def run_once(system: str, config: Config, secure: bool, workdir: Path) -> secagg.Result | flower_secagg.FlowerResult:
    if system == "coMind":
        return secagg.run(config.comind, secure)
    return flower_secagg.run(make_model(config.model_bytes), config.workers, config.flower_rounds, secure,
                             float(secagg.CHANGE), DEFAULT_CLIP_RANGE, workdir)


def measure(configs: Sequence[Config], repeats: int, workdir: Path) -> dict[Config, Runs]:
    runs: dict[Config, Runs] = {config: {(s, secure): [] for s in SYSTEMS for secure in (False, True)}
                                for config in configs}
    for repeat in range(repeats):
        # Alternate the order, so that neither system always runs on a machine the other just warmed.
        for config in configs:
            for system in SYSTEMS if repeat % 2 == 0 else SYSTEMS[::-1]:
                for secure in (False, True):
                    started = time.monotonic()
                    run_dir = workdir / f"{repeat}-{config.workers}-{config.model_bytes}-{system}-{secure}"
                    runs[config][system, secure].append(run_once(system, config, secure, run_dir))
                    print(f"[{time.strftime('%H:%M:%S')}] repeat {repeat + 1}, {config.name}, {system} "
                          f"{'secure' if secure else 'plain'}: {time.monotonic() - started:.0f} s",
                          file=sys.stderr, flush=True)
    return runs


def medians(shape: str, *columns: tuple[list, Callable[[Any], float]]) -> str:
    """Each column's median value over its runs, formatted by ``shape``, joined by " / "."""
    return " / ".join(shape.format(median([value(run) for run in runs])) for runs, value in columns)


def section(config: Config, runs: Runs) -> Section:
    params = config.model_bytes // 4
    comind, flower = ({secure: runs[system, secure] for secure in (False, True)} for system in SYSTEMS)
    rows = []
    for system, results in zip(SYSTEMS, (comind, flower), strict=True):
        ratio = median([s.round_seconds / p.round_seconds for p, s in zip(results[False], results[True], strict=True)])
        times = medians("{:8.1f}", *((results[secure], lambda r: r.round_seconds * 1e3) for secure in (False, True)))
        rows.append(Row(f"{system}: round time plain / secure", f"{times} ms  x{ratio:.2f}"))
    comind_masked = median([r.bytes["masked_input"] for r in comind[True]]) / params
    flower_masked = median([r.update_bytes for r in flower[True]]) / params
    rows.append(Row("masked input per parameter, coMind / Flower", f"{comind_masked:.3f} / {flower_masked:.3f} B",
                    "coMind <= half", comind_masked <= flower_masked / 2))
    rows.append(Row("plain update per parameter, coMind / Flower", medians(
        "{:.3f}", (comind[False], lambda r: r.bytes["received"] / params),
        (flower[False], lambda r: r.update_bytes / params)) + " B"))
    rows.append(Row("model to each worker per parameter, coMind / Flower", medians(
        "{:.3f}", (comind[True], lambda r: r.bytes["sent"] / params),
        (flower[True], lambda r: r.model_bytes / params)) + " B"))
    comind_stages = {stage: median([r.bytes[stage] for r in comind[True]])
                     for stage in ("advertise", "share", "unmask")}
    flower_stages = {stage: median([r.stage_bytes[stage] for r in flower[True]])
                     for stage in flower[True][0].stage_bytes}
    flower_stages["collect_masked_vectors"] -= median([r.model_bytes + r.update_bytes for r in flower[True]])
    rows.append(Row("coMind: keys and shares per worker", kilobytes(comind_stages)))
    rows.append(Row("Flower: keys, shares and message overhead per worker", kilobytes(flower_stages)))
    overhead = median([r.stage_bytes["plain"] - r.model_bytes - r.update_bytes for r in flower[False]])
    rows.append(Row("Flower: message overhead per worker, plain", f"{overhead / 1e3:.1f} kB"))
    rows.append(Row("Flower: largest error of the mean change, secure / plain",
                    f"{max(r.error for r in flower[True]):.2g} / {max(r.error for r in flower[False]):.2g} "
                    f"(of {float(secagg.CHANGE):g})"))
    for name, value, shape, unit in (
            ("a message's ClientApp start, from process to message", lambda r: r.start_seconds, "{:.2f}", "s"),
            ("a message's handling in the ClientApp", lambda r: r.work_seconds, "{:.3f}", "s"),
            ("a SuperNode's peak memory", lambda r: r.node_peak_bytes / MB, "{:.0f}", "MB")):
        rows.append(Row(f"Flower: {name}, plain / secure",
                        f"{medians(shape, (flower[False], value), (flower[True], value))} {unit}"))
    return Section(f"{config.name} ({params:,} parameters), per round", rows)


def not_run(small: Config, large: Config, runs: dict[Config, Runs]) -> str:
    """Why Flower is not run with 64 workers: its secure round and memory there, extrapolated from two configurations
    of one model size."""
    seconds = [median([r.round_seconds for r in runs[c]["Flower", True]]) for c in (small, large)]
    per_worker = (seconds[1] - seconds[0]) / (large.workers - small.workers)
    peak = median([r.node_peak_bytes for r in runs[large]["Flower", True]])
    at_64 = seconds[0] + per_worker * (64 - small.workers)
    return (f"Not run: 64 workers on Flower. On these 2 cores its secure round grows by {per_worker:.1f} s a worker "
            f"({small.workers} workers {seconds[0]:.0f} s, {large.workers} workers {seconds[1]:.0f} s: each message "
            f"starts a ClientApp process), so 64 would take about {at_64 / 60:.0f} min a "
            f"round, and 64 SuperNodes about {64 * peak / 1e9:.0f} GB ({peak / MB:.0f} MB each, with their "
            f"SuperExec and ClientApp). 8 workers with 10 MB is left out to keep the run short.")


def kilobytes(stages: dict[str, float]) -> str:
    return (f"{sum(stages.values()) / 1e3:.1f} kB ("
            + ", ".join(f"{stage} {value / 1e3:.1f}" for stage, value in stages.items()) + ")")


NOTES = (
    "Round time: the median gap between two rounds' new models (the first round, with start-up, left out); coMind: "
    "when the last worker got the model, Flower: when its ServerApp's strategy made it.",
    "Bytes, per worker and round, both directions. coMind: the ps's counts of its protocol's messages. Flower: the "
    "deflated objects of each message a SuperNode pulls and pushes, counted by a ClientApp mod; Flower sends "
    "each message's metadata and records along, counted here as message overhead.",
    "Flower's collect_masked_vectors stage carries the model down and the masked input up: shown less both.",
    "Flower's error under SecAgg+: its quantize() adds the clipping range to each value in the update's dtype "
    "(float32) before scaling it to the levels, so the sum keeps float32's resolution at 4 (4.8e-7, x10 here: "
    "each update is first scaled by its weight, 100 examples of max_weight 1000); coMind encodes in float64 with no "
    "shift, its values centred on 0.",
)


def main(argv: Sequence[str] | None = None) -> int:
    def add_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of every configuration [2]")

    flags = parse_flags(__doc__, RESULTS, argv, add_flags)
    started = time.perf_counter()
    configs = QUICK if flags.quick else FULL
    header = ["coMind secure aggregation against Flower's SecAgg+", *machine_facts(),
              f"flower    flwr {flower_side.ensure_installed()}, legacy path, SecAggPlusWorkflow and secaggplus_mod",
              f"run       {'quick' if flags.quick else 'full'}: {flags.repeats} alternating repeats (medians shown); "
              f"rounds per run coMind {COMIND_ROUNDS}, Flower {', '.join(str(c.flower_rounds) for c in configs)} "
              f"(the first not measured)"]
    with tempfile.TemporaryDirectory() as workdir:
        runs = measure(configs, flags.repeats, Path(workdir))
    sections = [section(config, runs[config]) for config in configs]
    notes = (*NOTES, not_run(configs[0], configs[1], runs))
    write_report(header, [*sections[:-1], dataclasses.replace(sections[-1], notes=notes)], started, flags.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
