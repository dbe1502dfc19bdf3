"""Distributed mode: every round is one step, whose gradients the ps averages and its Adam applies.

It must be the original's SyncReplicasOptimizer(Adam) exactly, that is one
process running Adam on the workers' batches together (docs/design.md,
decision 14): checked against one Keras process on Fashion-MNIST-shaped
data, and, without Keras, against Adam written out in NumPy on a linear
model whose workers hold batches of different sizes.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest

import comind
from comind import modes, settings
from comind.client import GlobalState
from comind.ps_main import server_optimizer
from comind.sync_replicas import step_change
from numpy_cluster import assert_finishes
from processes import ROOT
from sync_replicas_worker import CLASSES, SHAPE, combined_batches

STEPS = 30


def test_two_keras_workers_train_exactly_as_one_process_on_their_batches_together(start_ps, tmp_path):
    workers, batch_size = 2, 32
    ps = start_ps("--mode", "distributed", "--num-workers", str(workers), "--rounds", str(STEPS))
    outs = [tmp_path / f"worker-{task}.npz" for task in range(workers)]
    processes = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "sync_replicas_worker.py"), ps.address,
                                   str(task), "--workers", str(workers), "--batch-size", str(batch_size),
                                   "--steps", str(STEPS), "--out", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for task, out in enumerate(outs)]
    for process in processes:
        assert_finishes(process, ps, timeout=180)
    chief, other = (np.load(out, allow_pickle=False) for out in outs)
    count = len([key for key in chief.files if key.startswith("final_")])

    # One process: the original's learning rate, Keras's Adam, every step on the workers' 64 examples.
    model = keras.Sequential.from_config(_basic().get_config())
    model.compile(optimizer=keras.optimizers.Adam(math.sqrt(workers) * 1e-3), loss="sparse_categorical_crossentropy")
    model.set_weights([chief[f"initial_{i}"] for i in range(count)])
    x, y = combined_batches(STEPS, workers, batch_size)
    model.fit(x, y, batch_size=workers * batch_size, epochs=1, shuffle=False, verbose=0)

    expected = model.get_weights()
    for held in (chief, other):
        difference = max(float(np.abs(held[f"final_{i}"] - w).max()) for i, w in enumerate(expected))
        assert difference <= 1e-5, difference
    moved = max(float(np.abs(chief[f"initial_{i}"] - w).max()) for i, w in enumerate(expected))
    assert moved > 100 * 1e-5  # training moved the weights far beyond the tolerance
    ps.wait_for(r"Distributed mode: every round is one step of every worker, applied by fedadam")


def _basic() -> keras.Model:
    from comind import models

    return models.basic(SHAPE, CLASSES)


def test_numpy_workers_with_uneven_batches_get_the_adam_step_of_the_combined_batch(start_ps):
    """Linear least squares; worker 0's batches hold 20 examples, worker 1's 44."""
    sizes, learning_rate = (20, 44), math.sqrt(2) * 1e-3
    rng = np.random.default_rng(11)
    features, true_weights = 5, rng.normal(size=(5, 1))
    x = rng.normal(size=(STEPS * sum(sizes), features)).astype(np.float32)
    y = (x @ true_weights + 0.1 * rng.normal(size=(len(x), 1))).astype(np.float32)
    batches = np.split(np.arange(len(x)), np.cumsum([sizes] * STEPS)[:-1])  # step t: worker 0's, then worker 1's
    initial = [np.zeros((features, 1), np.float32), np.zeros(1, np.float32)]
    ps = start_ps("--mode", "distributed", "--num-workers", "2", "--rounds", str(STEPS))
    finals: dict[int, GlobalState] = {}

    def work(task: int) -> None:
        with comind.WorkerClient(ps.address, task_index=task) as client:
            state = client.join(initial)
            assert client.mode == modes.DISTRIBUTED
            for step in range(STEPS):
                rows = batches[2 * step + task]
                gradient = _least_squares_gradient(state.weights, x[rows], y[rows])
                state = client.sync(state.weights, num_examples=len(rows), change=[-g for g in gradient])
            finals[task] = state

    threads = [threading.Thread(target=work, args=(task,)) for task in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert finals[0].done and finals[0].round == STEPS

    # Adam as Keras computes it (Kingma and Ba's step size; epsilon added to sqrt(v)), in float64, on each
    # step's 64 examples together.
    weights = [w.astype(np.float64) for w in initial]
    m, v = [np.zeros_like(w) for w in weights], [np.zeros_like(w) for w in weights]
    for t in range(1, STEPS + 1):
        rows = np.concatenate(batches[2 * t - 2:2 * t])
        gradient = _least_squares_gradient(weights, x[rows], y[rows])
        alpha = learning_rate * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        for i, g in enumerate(gradient):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            weights[i] = weights[i] - alpha * m[i] / (np.sqrt(v[i]) + 1e-7)
    for task in (0, 1):
        for held, expected in zip(finals[task].weights, weights, strict=True):
            np.testing.assert_allclose(held, expected, atol=1e-6)
    assert np.abs(weights[0]).max() > 100 * 1e-6


def _least_squares_gradient(weights, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The gradient of the mean squared error of ``x @ kernel + bias`` against ``y``."""
    kernel, bias = weights
    error = x @ kernel + bias - y
    return [2 / len(x) * x.T @ error, 2 / len(x) * error.sum(axis=0)]


def test_distributed_mode_defaults_to_keras_adam_at_the_original_learning_rate():
    name, optimizer = server_optimizer(settings.load("ps", {"mode": "distributed", "num_workers": 4}))
    assert name == "fedadam"
    assert (optimizer.learning_rate, optimizer.beta1, optimizer.beta2, optimizer.epsilon) == (2e-3, 0.9, 0.999, 1e-7)
    name, optimizer = server_optimizer(settings.load("ps", {"mode": "distributed", "server_optimizer": "fedavg",
                                                            "server_learning_rate": 0.5}))
    assert (name, optimizer.learning_rate) == ("fedavg", 0.5)
    name, optimizer = server_optimizer(settings.load("ps", {}))
    assert (name, optimizer.learning_rate, optimizer.beta2, optimizer.epsilon) == ("fedavg", None, 0.99, 1e-3)


def test_a_round_is_one_step_in_distributed_mode():
    assert settings.load("ps", {"mode": "distributed", "dataset": "fashion_mnist"}).rounds == \
        settings.load("ps", {"interval_steps": 1, "dataset": "fashion_mnist"}).rounds


def test_a_step_sends_minus_its_gradients_exactly_and_other_weights_as_they_changed():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    base = model.get_weights()
    # A gradient far below a weight's rounding: subtracting weights would lose it, the change must not.
    gradients = {id(v): np.full(v.shape, 1e-12, np.float32) for v in model.trainable_variables}
    moving_mean = model.layers[1].moving_mean
    moving_mean.assign(moving_mean.numpy() + 0.5)
    change = step_change(model, gradients, base)
    for variable, changed in zip(model.weights, change, strict=True):
        if variable.trainable:
            assert np.array_equal(changed, np.full(variable.shape, -1e-12, np.float32))
        elif variable is moving_mean:
            np.testing.assert_allclose(changed, 0.5)


def test_a_variable_without_a_gradient_in_a_step_sends_none_not_the_last_steps():
    optimizer = comind.SyncReplicasOptimizer()
    first, second = keras.Variable(np.zeros(2, np.float32)), keras.Variable(np.zeros(3, np.float32))
    optimizer.apply([np.ones(2, np.float32), np.ones(3, np.float32)], [first, second])
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        optimizer.apply([np.full(2, 2, np.float32), None], [first, second])
    kept = optimizer.gradients()
    assert kept[id(first)].tolist() == [2, 2] and kept[id(second)].tolist() == [0, 0, 0]
    assert first.numpy().tolist() == [0, 0]  # no step taken here


class _Client:
    is_chief, replicas_to_aggregate, federated_eval_every = True, None, 0

    def __init__(self, mode: str):
        self.mode = mode

    def join(self, weights, names=None) -> GlobalState:
        return GlobalState(list(weights), 0, False)


@pytest.mark.parametrize(("mode", "optimizer", "says"), [
    (modes.DISTRIBUTED, keras.optimizers.Adam, "Compile the model with optimizer=comind.SyncReplicasOptimizer()"),
    (modes.FEDERATED, comind.SyncReplicasOptimizer, "Start every process with --mode distributed"),
])
def test_a_model_whose_optimizer_does_not_train_in_the_ps_mode_is_refused_at_the_start(mode, optimizer, says):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer(), loss="mse")
    with pytest.raises(ValueError, match=says):
        model.fit(np.zeros((4, 3)), np.zeros((4, 2)), callbacks=[comind.FederatedAveraging(_Client(mode))],
                  verbose=0)


def test_fedprox_is_refused_in_distributed_mode():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    wrapper = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(), model, _Client(modes.DISTRIBUTED),
                                                 proximal_mu=0.1)
    with pytest.raises(ValueError, match="Leave proximal_mu at 0"):
        wrapper.start()

