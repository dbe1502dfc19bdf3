"""coMind's server optimizers against Flower 1.42's strategies, on the same worker updates.

A seeded sequence of updates (20 rounds, 3 workers with 50, 120 and 330
examples, two float64 tensors) goes to:

* coMind's round pipeline (``comind.pipeline.ServerPipeline``: example
  weighting, the mean, the server optimizer), as deltas, as workers send them;
* Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad, through their
  ``aggregate_fit`` with a ``FitRes`` per worker holding the worker's model
  (Flower's current global model plus the delta), in Flower's own virtual
  environment (bench/.venv-flower, made by bench/setup-flower: flwr needs
  protobuf 6, coMind protobuf 7). The two exchange arrays as .npz files,
  without pickle.

It prints the largest absolute difference between the two global models over
the 20 rounds, for each optimizer, with the same hyperparameters on both
sides (coMind's defaults: eta 1.0 for FedAvgM with mu 0.9, 0.1 Adam and
Adagrad, 0.01 Yogi; b1 0.9, b2 0.99, tau 1e-3), and explains the
differences that are Flower's:

* FedAdam: Flower corrects Adam's bias with ``t + 1`` where Keras (and
  coMind) use the step ``t``, counted from 1. Numbering Flower's rounds from
  0 instead aligns the two.
* FedAdagrad: Flower fixes ``b1 = 0`` (no momentum on ``m``); Reddi et al.
  and coMind keep ``b1``. With ``--server-beta1 0`` coMind is Flower's.

    .venv/bin/python bench/server_optimizers.py [--flower-python PATH]

Writes its output to bench/results/server_optimizers.txt as well. It takes
about a second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results" / "server_optimizers.txt"
ROUNDS, EXAMPLES, SHAPES = 20, (50, 120, 330), ((64, 10), (10,))
HYPERPARAMETERS = {"fedavgm": {"learning_rate": 1.0, "momentum": 0.9},
                   "fedadam": {"learning_rate": 0.1, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-3},
                   "fedyogi": {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-3},
                   "fedadagrad": {"learning_rate": 0.1, "beta1": 0.9, "epsilon": 1e-3}}


def updates(seed: int = 0) -> tuple[list[np.ndarray], list[list[list[np.ndarray]]]]:
    """The initial model, and each round's deltas per worker: a shared drift plus each worker's own."""
    rng = np.random.default_rng(seed)
    initial = [rng.normal(scale=0.1, size=shape) for shape in SHAPES]
    drift = [rng.normal(scale=0.02, size=shape) for shape in SHAPES]
    deltas = [[[d + rng.normal(scale=0.05, size=d.shape) for d in drift] for _ in EXAMPLES] for _ in range(ROUNDS)]
    return initial, deltas


def flat(arrays: dict[str, np.ndarray], prefix: str, tensors: list[np.ndarray]) -> None:
    arrays.update({f"{prefix}/{i}": t for i, t in enumerate(tensors)})


def unflat(arrays: np.lib.npyio.NpzFile, prefix: str) -> list[np.ndarray]:
    return [arrays[f"{prefix}/{i}"] for i in range(len(SHAPES))]


# coMind's side ----------------------------------------------------------------------------------------------------


def comind_models(name: str, initial: list[np.ndarray], deltas: list[list[list[np.ndarray]]],
                  **hyperparameters: float) -> list[list[np.ndarray]]:
    """The global model after each round, through the ps's pipeline."""
    sys.path.insert(0, str(ROOT))
    from comind.pipeline import PipelineSettings, ServerPipeline
    from comind.server_optimizers import ServerOptimizerSettings
    from comind.tensors import Layout

    pipeline = ServerPipeline(PipelineSettings(
        server_optimizer=name, server_optimizer_settings=ServerOptimizerSettings(**hyperparameters)))
    layout = Layout.of(initial)
    packed, models = layout.pack(initial), []
    for round_deltas in deltas:
        round = pipeline.start_round(layout)
        for examples, delta in zip(EXAMPLES, round_deltas, strict=True):
            round.add([d.copy() for d in delta], pipeline.weight(examples))
        packed, state = pipeline.step(layout, packed, round.result())
        pipeline.commit(state)
        models.append([view.copy() for view in layout.views(packed)])
    return models


# Flower's side: run by Flower's Python, it imports only NumPy and flwr --------------------------------------------


def flower_side(inputs: Path, outputs: Path) -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

    data = np.load(inputs, allow_pickle=False)
    initial = unflat(data, "initial")
    deltas = [[unflat(data, f"delta/{r}/{k}") for k in range(len(EXAMPLES))] for r in range(ROUNDS)]
    start = ndarrays_to_parameters(initial)
    h = HYPERPARAMETERS
    strategies = {
        "fedavgm": lambda: FedAvgM(initial_parameters=start, server_learning_rate=h["fedavgm"]["learning_rate"],
                                   server_momentum=h["fedavgm"]["momentum"]),
        "fedadam": lambda: FedAdam(initial_parameters=start, eta=h["fedadam"]["learning_rate"],
                                   beta_1=h["fedadam"]["beta1"], beta_2=h["fedadam"]["beta2"],
                                   tau=h["fedadam"]["epsilon"]),
        "fedyogi": lambda: FedYogi(initial_parameters=start, eta=h["fedyogi"]["learning_rate"],
                                   beta_1=h["fedyogi"]["beta1"], beta_2=h["fedyogi"]["beta2"],
                                   tau=h["fedyogi"]["epsilon"]),
        "fedadagrad": lambda: FedAdagrad(initial_parameters=start, eta=h["fedadagrad"]["learning_rate"],
                                         tau=h["fedadagrad"]["epsilon"])}
    # "fedadam-from-0": Flower's FedAdam told that the first round is round 0.
    runs = [(name, name, 1) for name in strategies] + [("fedadam-from-0", "fedadam", 0)]
    results: dict[str, np.ndarray] = {}
    for label, name, first_round in runs:
        strategy, current = strategies[name](), initial
        for r in range(ROUNDS):
            # Each worker's model: Flower's global model plus the worker's delta. No proxy: aggregate_fit ignores it.
            models = [[w + d for w, d in zip(current, delta, strict=True)] for delta in deltas[r]]
            fit = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(model), examples, {}))
                   for examples, model in zip(EXAMPLES, models, strict=True)]
            parameters, _ = strategy.aggregate_fit(first_round + r, fit, [])
            current = parameters_to_ndarrays(parameters)
            flat(results, f"{label}/{r}", current)
    np.savez(outputs, **results)


def flower_models(python: Path, initial: list[np.ndarray],
                  deltas: list[list[list[np.ndarray]]]) -> tuple[str, dict[str, list[list[np.ndarray]]]]:
    """Flower's version and its global model after each round, per run."""
    with tempfile.TemporaryDirectory() as workdir:
        inputs, outputs = Path(workdir) / "inputs.npz", Path(workdir) / "outputs.npz"
        arrays: dict[str, np.ndarray] = {}
        flat(arrays, "initial", initial)
        for r, round_deltas in enumerate(deltas):
            for k, delta in enumerate(round_deltas):
                flat(arrays, f"delta/{r}/{k}", delta)
        np.savez(inputs, **arrays)
        code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import server_optimizers as s; " \
               f"import flwr; print(flwr.__version__); s.flower_side(*map(s.Path, sys.argv[1:]))"
        done = subprocess.run([str(python), "-c", code, str(inputs), str(outputs)], capture_output=True,
                              text=True, check=False, env={"PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0"})
        if done.returncode:
            raise SystemExit(f"Flower's side failed:\n{done.stderr}")
        results = np.load(outputs, allow_pickle=False)
        labels = sorted({key.split("/")[0] for key in results.files})
        return done.stdout.strip(), {label: [unflat(results, f"{label}/{r}") for r in range(ROUNDS)]
                                     for label in labels}


def largest_difference(mine: list[list[np.ndarray]], theirs: list[list[np.ndarray]]) -> float:
    return max(float(np.abs(a - b).max()) for m, t in zip(mine, theirs, strict=True)
               for a, b in zip(m, t, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flower-python", type=Path, default=BENCH / ".venv-flower" / "bin" / "python",
                        help="Python of a virtual environment with flwr 1.42 (bench/setup-flower makes one)")
    args = parser.parse_args()
    if not args.flower_python.exists():
        raise SystemExit(f"No Python with Flower at {args.flower_python}: run bench/setup-flower, or pass "
                         f"--flower-python. Received: --flower-python={args.flower_python}")
    initial, deltas = updates()
    version, flower = flower_models(args.flower_python, initial, deltas)
    h = HYPERPARAMETERS
    rows = [
        ("fedavgm", "fedavgm", h["fedavgm"], "same equations; rounding: Flower averages models, coMind deltas"),
        ("fedadam", "fedadam", h["fedadam"], "Flower corrects the bias with t + 1: one step ahead of Keras"),
        ("fedadam", "fedadam-from-0", h["fedadam"], "Flower's rounds numbered from 0: the offset aligned"),
        ("fedyogi", "fedyogi", h["fedyogi"], "same equations (neither corrects the bias)"),
        ("fedadagrad", "fedadagrad", h["fedadagrad"], "Flower fixes b1 = 0; coMind keeps b1 = 0.9"),
        ("fedadagrad", "fedadagrad", {**h["fedadagrad"], "beta1": 0.0}, "coMind with --server-beta1 0"),
    ]
    lines = [f"coMind's server optimizers against Flower {version}'s strategies",
             f"{ROUNDS} rounds, {len(EXAMPLES)} workers with {', '.join(map(str, EXAMPLES))} examples, float64 "
             f"tensors {' and '.join(str(s) for s in SHAPES)}; the same seeded updates for both.",
             "Largest absolute difference between the global models, over every round and weight:", ""]
    for name, label, hyperparameters, note in rows:
        mine = comind_models(name, initial, deltas, **hyperparameters)
        settings = ", ".join(f"{k} {v:g}" for k, v in hyperparameters.items())
        lines.append(f"{name:<11} vs Flower {label:<15} {largest_difference(mine, flower[label]):9.2e}  "
                     f"({settings}) {note}")
    last = comind_models("fedadam", initial, deltas, **h["fedadam"])[-1]
    lines += ["", f"For scale: the initial weights are about 0.1; after {ROUNDS} rounds coMind's fedadam model is "
              f"{largest_difference([last], [initial]):.2f} from them at most.",
              "coMind's fedadam is Keras's Adam stepping on -D (tests/test_server_optimizers.py)."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
