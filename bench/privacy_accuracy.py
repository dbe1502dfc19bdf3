"""Privacy against accuracy on the digits: epsilon after training and the test accuracy it leaves, and DP's cost.

    PYTHONPATH=. python bench/privacy_accuracy.py [--rounds 100] [--local-rounds 50]

1. Worker-level DP-FedAvg (``--dp-noise-multiplier z --dp-clip C`` with
   ``--client-fraction 0.1``): 200 workers, each one person holding 7 or 8 of
   the 1,437 training digits (an IID split), a Poisson sample of q = 0.1 of
   them a round (20 expected), 100 rounds. The ps is the real one, in
   process: the :class:`comind.ps.ParameterServer` core that ``comind ps``
   serves (built from the same settings by ``ps_main``), with its client
   sampling, DP stage (clip, CSPRNG noise, fixed denominator q N) and ledger;
   only gRPC is left out, so that 200 workers fit on two shared cores. Each
   worker is a softmax regression (64 inputs, 10 classes, 650 parameters) in
   NumPy: 10 full-batch gradient steps at learning rate 0.5 on its own
   examples a round, then it sends its change. The accuracy is the global
   model's on the 360 test digits. Without DP the same federation samples 20
   workers a round (fixed size) and takes their unweighted mean.
   The ps's time per round (every update's decoding and aggregation, and
   the round's close: DP's noise and accounting) is measured in these runs.
2. Example-level DP-SGD (``--dp-example-clip C --dp-example-noise-multiplier
   z``): ``comind local --workers 2`` trains the basic Keras model on the
   digits, each worker on its half (718 or 719 examples, batch 32, q = 0.045
   a step), ``--interval-steps 20``; each worker's epsilon (its own ledger,
   ``example_epsilon`` in metrics.json) and the global model's final test
   accuracy, and the median round time (``round_seconds``) and the examples
   trained a second with and without DP-SGD. Adam at 1e-3 (the default),
   not tuned for DP.

Epsilon is at delta 1e-5 (RDP). Noise multipliers 0.5, 1 and 2, and none.
Writes bench/results/privacy_accuracy.txt and bench/results/privacy_accuracy.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from prometheus_client import CollectorRegistry

from comind import datasets, settings
from comind.metrics import PsMetrics
from comind.ps import ParameterServer, UpdateHeader, UpdateKind, UpdateResult
from comind.ps_main import round_policy, server_pipeline
from comind.tensors import Layout, chunks
from privacy import large_model_costs
from training import examples_per_second, run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
NOISE_MULTIPLIERS = (None, 0.5, 1.0, 2.0)  # None: no DP
WORKERS, FRACTION, CLASSES = 200, 0.1, 10
#: Worker-level runs per noise level: the noise (from the OS) and the draws (from secrets) differ in each.
REPEATS = 3
LOCAL_STEPS, LOCAL_LEARNING_RATE = 10, 0.5
#: Worker-level C: about the median norm of a worker's change without DP (0.79 over 100 rounds, more in the first):
#: a setting chosen on the data, which a deployment would pay privacy for, or leave to --dp-clip adaptive.
WORKER_CLIP = 1.0
#: Example-level C: below almost every example's gradient norm (median about 4.3 for the basic model on the digits),
#: so that each is clipped: Adam's steps do not grow with the gradient, and the noise's share is z at any such C.
EXAMPLE_CLIP = 1.0
INTERVAL_STEPS = 20


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The embedded digits, pixels scaled to [0, 1] and flattened to 64 inputs."""
    d = datasets.load("digits")
    flat = [np.asarray(x, np.float64).reshape(len(x), -1) / 255.0 for x in (d.x_train, d.x_test)]
    return flat[0], np.asarray(d.y_train, np.int64), flat[1], np.asarray(d.y_test, np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def local_change(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """A worker's round: full-batch gradient descent on the cross-entropy of its examples; its change."""
    kernel, bias = (w.astype(np.float64) for w in weights)
    start = [kernel.copy(), bias.copy()]
    onehot = np.eye(CLASSES)[y]
    for _ in range(LOCAL_STEPS):
        error = (softmax(x @ kernel + bias) - onehot) / len(x)
        kernel -= LOCAL_LEARNING_RATE * x.T @ error
        bias -= LOCAL_LEARNING_RATE * error.sum(axis=0)
    return [(kernel - start[0]).astype(np.float32), (bias - start[1]).astype(np.float32)]


def accuracy(weights: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ weights[0] + weights[1], axis=1) == y))


async def data(layout: Layout, arrays: Sequence[np.ndarray]) -> AsyncIterator[bytes]:
    for chunk in chunks(layout.pack(arrays)):
        yield chunk


async def federation(z: float | None, rounds: int) -> dict:
    """One worker-level run through the ps core: the test accuracy after each round, epsilon, the ps's seconds."""
    flags = {"num_workers": WORKERS, "client_fraction": FRACTION, "rounds": rounds, "weighting": "uniform",
             "lease_seconds": 3600, "round_timeout": 3600}
    if z is not None:
        flags |= {"dp_noise_multiplier": z, "dp_clip": WORKER_CLIP}
    loaded = settings.load("ps", {k: str(v) for k, v in flags.items()})
    policy = round_policy(loaded)
    ps = ParameterServer(policy, PsMetrics(CollectorRegistry()), pipeline=server_pipeline(loaded, policy))
    x_train, y_train, x_test, y_test = digits()
    rng = np.random.default_rng(0)
    shards = np.array_split(rng.permutation(len(x_train)), WORKERS)
    members = [ps.join(task, f"worker {task}").member_id for task in range(WORKERS)]
    initial = [np.zeros((x_train.shape[1], CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
    layout = Layout.of(initial, ["kernel", "bias"])
    assert await ps.receive(members[0], UpdateHeader(UpdateKind.INITIAL, 0, layout), data(layout, initial)) \
        is UpdateResult.ACCEPTED
    curve, ps_seconds, norms = [], [], []
    while not ps.done:
        assert ps.model is not None
        round, weights = ps.round + 1, [v.copy() for v in layout.views(ps.model.packed)]
        chosen = [task for task, member in enumerate(members) if ps.rounds.is_selected(member)]
        spent = 0.0
        for task in chosen:
            change = local_change(weights, x_train[shards[task]], y_train[shards[task]])
            norms.append(float(np.sqrt(sum(np.sum(c.astype(np.float64) ** 2) for c in change))))
            header = UpdateHeader(UpdateKind.DELTA, round, layout, len(shards[task]))
            started = time.perf_counter()
            assert await ps.receive(members[task], header, data(layout, change)) is UpdateResult.ACCEPTED
            spent += time.perf_counter() - started
        if ps.round >= round:  # closed (a Poisson draw of no one closes at once, with no update to time)
            assert ps.model is not None
            curve.append(accuracy(layout.views(ps.model.packed), x_test, y_test))
            if chosen:
                ps_seconds.append(spent)
    assert ps.model is not None
    return {"z": z, "curve": curve, "accuracy": curve[-1], "epsilon": ps.model.epsilon if z else None,
            "ps_ms": 1000 * statistics.median(ps_seconds), "median_norm": statistics.median(norms)}


def example_level(z: float | None, rounds: int, workdir: Path) -> dict:
    """One `comind local --workers 2` run: the final test accuracy, the chief's epsilon, its rounds' time."""
    output = workdir / f"example-{z}"
    flags = ["local", "--workers", "2", "--shard", "iid", "--interval-steps", str(INTERVAL_STEPS), "--rounds",
             str(rounds), "--eval-every", "1", "--seed", "0"]
    if z is not None:
        flags += ["--dp-example-clip", str(EXAMPLE_CLIP), "--dp-example-noise-multiplier", str(z)]
    run(flags, output)
    metrics = json.loads((output / "metrics.json").read_text())
    seconds = [r["round_seconds"] for r in metrics["rounds"] if r.get("round_seconds") is not None]
    logs = [p.read_text() for p in sorted((output / "logs").glob("worker-*.log"))]
    return {"z": z, "curve": [r["eval_accuracy"] for r in metrics["rounds"] if r["eval_accuracy"] is not None],
            "accuracy": metrics["final"]["eval_accuracy"], "epsilon": metrics["final"].get("example_epsilon"),
            "round_s": statistics.median(seconds), "rate": examples_per_second(logs)}


def step_costs(steps: int = 40) -> tuple[float, float]:
    """Milliseconds of one local step of the basic model on a batch of 32 digits: plain, and DP-SGD (median)."""
    import keras

    from comind import models
    from comind.dpsgd import ExampleLevelPrivacy
    from comind.worker import prepare

    d = datasets.load("digits")
    x, y = prepare(d.x_train[:32]), d.y_train[:32]
    plain, private = (models.build("basic", d.input_shape, d.num_classes) for _ in range(2))
    ExampleLevelPrivacy(EXAMPLE_CLIP, 1.0).install(private)
    times: tuple[list[float], list[float]] = ([], [])
    for step in range(steps + 2):  # alternately, so that a busy machine's load hits both alike; 2 to trace
        for model, seconds in zip((plain, private), times, strict=True):
            started = time.perf_counter()
            model.train_on_batch(x, y)
            if step >= 2:
                seconds.append(time.perf_counter() - started)
    keras.backend.clear_session()
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def shown(epsilon: float | None) -> str:
    return "none (no DP)" if epsilon is None else f"{epsilon:.3g}"


def label(z: float | None) -> str:
    return "no DP" if z is None else f"z = {z:g}"


def plot(worker: list[dict], example: list[dict], path: Path) -> None:
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    for axes, runs, title, x_label in (
            (left, worker, f"worker-level DP-FedAvg: {WORKERS} workers, q = {FRACTION}", "round"),
            (right, example, "example-level DP-SGD: 2 workers", "round")):
        for result in runs:
            axes.plot(range(1, len(result["curve"]) + 1), result["curve"],
                      label=f"{label(result['z'])}: epsilon {shown(result['epsilon'])}")
        axes.set(title=title, xlabel=x_label, ylabel="test accuracy (360 digits)", ylim=(0, 1))
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="worker-level rounds")
    parser.add_argument("--local-rounds", type=int, default=50, help="example-level rounds (comind local)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("comind").setLevel(logging.ERROR)  # the ps's warnings of few updates a round: known here
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's orders that do not converge: left out
    lines = [f"bench/privacy_accuracy.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores shared with "
             f"other work (load average {os.getloadavg()[0]:.1f} at the start: timings are loose), "
             f"Python {platform.python_version()}", "epsilon at delta 1e-5 (RDP)", ""]
    repeats = {z: [asyncio.run(federation(z, args.rounds)) for _ in range(REPEATS)] for z in NOISE_MULTIPLIERS}
    worker = [runs[0] for runs in repeats.values()]
    lines += [f"worker-level DP-FedAvg: {WORKERS} workers (7-8 digits each), Poisson q = {FRACTION} "
              f"(20 a round expected), {args.rounds} rounds, C = {WORKER_CLIP}, softmax regression; "
              f"{REPEATS} runs each: test accuracy median [min, max], the ps's ms a round median, a worker's "
              f"change's median L2 norm before clipping",
              f"{'noise':<10}{'epsilon':>14}{'test accuracy':>26}{'ps ms/round':>13}{'update norm':>13}"]
    for z, runs in repeats.items():
        accuracies = sorted(r["accuracy"] for r in runs)
        spread = f"{statistics.median(accuracies):.3f} [{accuracies[0]:.3f}, {accuracies[-1]:.3f}]"
        lines.append(f"{label(z):<10}{shown(runs[0]['epsilon']):>14}{spread:>26}"
                     f"{statistics.median(r['ps_ms'] for r in runs):>13.2f}"
                     f"{statistics.median(r['median_norm'] for r in runs):>13.3f}")
    mean_ms, dp_ms = large_model_costs()
    lines.append(f"the ps's pipeline for a 10 MB model and 8 updates, alternately: mean {mean_ms:.0f} ms a round, DP "
                 f"{dp_ms:.0f} ms (median of 5 each)")
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        example = []
        for z in NOISE_MULTIPLIERS:
            example.append(example_level(z, args.local_rounds, Path(workdir)))
            print(example[-1], flush=True)
    lines += ["", f"example-level DP-SGD: comind local --workers 2, basic model, batch 32 (q = 0.045), "
                  f"{args.local_rounds} rounds of {INTERVAL_STEPS} steps, C = {EXAMPLE_CLIP}",
              f"{'noise':<10}{'epsilon':>14}{'test accuracy':>15}{'s/round':>13}{'examples/s':>12}"]
    lines += [f"{label(r['z']):<10}{shown(r['epsilon']):>14}{r['accuracy']:>15.3f}{r['round_s']:>13.2f}"
              f"{r['rate']:>12.0f}" for r in example]
    lines.append("(s/round: the chief's median time between global models, testing each one included; examples/s: "
                 "trained, summed over the two workers, syncs included)")
    plain_ms, private_ms = step_costs()
    lines.append(f"one local step, basic model, batch 32, alternately: plain {plain_ms:.1f} ms, DP-SGD "
                 f"{private_ms:.1f} ms (median of 40 each)")
    lines.append(f"load average at the end: {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "privacy_accuracy.txt").write_text(text)
    plot(worker, example, RESULTS / "privacy_accuracy.png")


if __name__ == "__main__":
    main()
