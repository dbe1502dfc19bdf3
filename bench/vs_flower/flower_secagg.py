"""One Flower run of bench/secagg.py's task (bench/vs_flower/secagg_app), with the SecAgg+ workflow or without it.

It runs on the same SuperLink, SuperNodes and settings as bench/flower.py (flower_side.run_app), and reads what
the app recorded: the ServerApp's moment each round's model existed, and the ClientApp's count of each message's
bytes (bench/vs_flower/secagg_app/fedsecagg/client_app.py says what it counts).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from vs_flower.flower_side import run_app

APP = Path(__file__).resolve().parent / "secagg_app"


@dataclasses.dataclass(frozen=True)
class FlowerResult:
    round_seconds: float           # the median gap between two rounds' models (round 1, with start-up, left out)
    stage_bytes: dict[str, float]  # messages' bytes both ways by SecAgg+ stage ("plain" without), per worker, round
    model_bytes: float             # of which the global model's tensors, received
    update_bytes: float            # of which the update's tensors (plain) or the masked input (SecAgg+), sent
    error: float                   # the largest distance of a round's unmasked mean delta from the true change
    node_peak_bytes: int           # the largest SuperNode's peak memory, with its SuperExec and ClientApps
    start_seconds: float           # the median message's ClientApp process, from its start to the message
    work_seconds: float            # the median message's handling in the ClientApp (SecAgg+, client, counting)


def run(model: list[np.ndarray], workers: int, rounds: int, secure: bool, change: float, clip_range: float,
        workdir: Path) -> FlowerResult:
    """``rounds`` rounds of ``workers`` Flower nodes changing ``model``; the first round is not measured."""
    workdir.mkdir(parents=True)
    model_path, records, wire = workdir / "model.npz", workdir / "rounds.jsonl", workdir / "wire.jsonl"
    np.savez(model_path, *model)
    memory = run_app(APP, workers, {"num-workers": workers, "num-server-rounds": rounds, "secure-aggregation": secure,
                           "clip-range": clip_range, "change": change, "model-path": str(model_path),
                           "record-path": str(records), "wire-path": str(wire)}, rounds, workdir)
    closed = [json.loads(line) for line in records.read_text().splitlines()]
    messages = [json.loads(line) for line in wire.read_text().splitlines()]
    measured = [m for m in messages if m["round"] > 1]
    per_worker_round = (rounds - 1) * workers
    stages: dict[str, float] = defaultdict(float)
    for message in measured:
        stages[message["stage"]] += (message["received"] + message["sent"]) / per_worker_round
    return FlowerResult(statistics.median(np.diff([r["closed"] for r in closed])), dict(stages),
                        sum(m["model"] for m in measured) / per_worker_round,
                        sum(m["update"] for m in measured) / per_worker_round,
                        max(r["error"] for r in closed), memory.peak("worker"),
                        statistics.median(m["start_seconds"] for m in measured),
                        statistics.median(m["work_seconds"] for m in measured))
