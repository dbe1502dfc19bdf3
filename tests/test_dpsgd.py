"""Example-level DP-SGD on a worker (Abadi et al. 2016): per-example clipping, the noise, the worker's ledger.

The model is the basic one on 28x28 images, as it trains on Fashion-MNIST.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from prometheus_client import CollectorRegistry

import comind
from comind import models
from comind.dpsgd import ExampleAccountant, ExampleLevelPrivacy, check, private_sum
from comind.metrics import WorkerMetrics
from events import tensorboard_scalars
from tests.test_fedprox import FakeClient

ROOT = Path(__file__).resolve().parent.parent
BATCH, SHAPE, CLASSES = 32, (28, 28), 10
SEED = np.array([7, 11], np.int64)


def basic(learning_rate: float = 0.1) -> keras.Model:
    keras.utils.set_random_seed(2)
    return models.build("basic", SHAPE, CLASSES, optimizer=keras.optimizers.SGD(learning_rate))


def batch(size: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    return rng.random((size, *SHAPE), np.float32), np.arange(size) % CLASSES


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(t) for t in tensors])


def test_per_example_gradients_are_each_examples_own():
    model, (x, y) = basic(), batch(4)
    per_example, _, _ = ExampleLevelPrivacy(1.0, 0.0).per_example(model, x, y)
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x[i:i + 1], y=y[i:i + 1], y_pred=model(x[i:i + 1], training=True))
        own = tape.gradient(loss, model.trainable_variables)
        np.testing.assert_allclose(flat(g[i] for g in per_example), flat(own), rtol=1e-5, atol=1e-6)


def test_an_examples_influence_on_the_step_is_at_most_clip_over_batch():
    """One example's gradient is thousands of times the clip: with it or without it, the step moves by C / B."""
    clip = 0.5
    model, (x, y) = basic(), batch()
    x[0] *= 1e4  # a huge input: a huge gradient of the first layer
    per_example, _, _ = ExampleLevelPrivacy(clip, 0.0).per_example(model, x, y)
    assert np.linalg.norm(flat(g[0] for g in per_example)) > 1000 * clip
    with_it = flat(private_sum(per_example, clip, 0.0, BATCH, SEED))
    without_it = flat(private_sum([g[1:] for g in per_example], clip, 0.0, BATCH, SEED))
    assert np.linalg.norm(with_it - without_it) == pytest.approx(clip / BATCH, rel=1e-4)
    # Every other example is bounded too.
    for i in range(1, BATCH):
        others = [np.delete(np.asarray(g), i, axis=0) for g in per_example]
        assert np.linalg.norm(with_it - flat(private_sum(others, clip, 0.0, BATCH, SEED))) <= clip / BATCH * 1.0001


def test_without_noise_and_with_a_huge_clip_the_step_is_the_plain_gradient_step():
    x, y = batch()
    plain, private = basic(), basic()
    ExampleLevelPrivacy(1e9, 0.0).install(private)
    plain_history = plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
    private_history = private.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history
    for a, b in zip(plain.get_weights(), private.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert private_history["loss"][0] == pytest.approx(plain_history["loss"][0], rel=1e-5)
    assert private_history["accuracy"] == plain_history["accuracy"]


def test_the_noise_has_std_z_clip_over_batch():
    clip, z = 0.5, 1.5
    model, (x, y) = basic(), batch()
    per_example, _, _ = ExampleLevelPrivacy(clip, z).per_example(model, x, y)
    noise = flat(private_sum(per_example, clip, z, BATCH, SEED)) - flat(private_sum(per_example, clip, 0.0, BATCH,
                                                                                      SEED))
    assert noise.size > 100_000
    assert np.std(noise) == pytest.approx(z * clip / BATCH, rel=0.02)
    assert abs(np.mean(noise)) < 0.02 * z * clip / BATCH


def test_the_noise_is_keyed_anew_every_step_from_secrets_or_reproducibly_from_a_seed():
    model, (x, y) = basic(), batch()
    secret = ExampleLevelPrivacy(0.5, 1.0)
    first, second = (flat(secret.gradients(model, x, y)[0]) for _ in range(2))
    assert not np.allclose(first, second)
    seeded = ExampleLevelPrivacy(0.5, 1.0, seed=3)
    np.testing.assert_array_equal(flat(seeded.gradients(model, x, y)[0]), flat(seeded.gradients(model, x, y)[0]))


def test_the_workers_ledger_matches_dp_accounting():
    import dp_accounting

    accountant = ExampleAccountant(1.1, BATCH, 1600, 1e-5)
    for _ in range(500):
        accountant.step()
    expected = dp_accounting.rdp.RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 500)
    assert accountant.steps == 500
    assert accountant.epsilon == pytest.approx(expected.get_epsilon(1e-5), rel=1e-9)
    # ALGORITHMS.md's reference: q = 0.01, z = 1.0, 1000 steps, delta 1e-5.
    reference = ExampleAccountant(1.0, 10, 1000, 1e-5)
    reference.step(1000)
    assert reference.epsilon == pytest.approx(2.1014, abs=1e-3)


@pytest.mark.parametrize("clip, z", [(1.0, None), (None, 1.0), (0.0, 1.0), (1.0, -1.0)])
def test_half_or_bad_settings_are_refused(clip, z):
    with pytest.raises(ValueError, match="dp_example"):
        check(clip, z)


def test_the_callback_trains_with_dp_sgd_and_reports_the_workers_epsilon():
    model, (x, y) = basic(), batch(4 * BATCH)
    registry = CollectorRegistry()
    callback = comind.FederatedAveraging(FakeClient(model.get_weights()), interval_steps=2, batch_size=BATCH,
                                         metrics=WorkerMetrics(registry), num_examples=len(x), dp_example_clip=1.0,
                                         dp_example_noise_multiplier=1.1)
    model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[callback], verbose=0)
    assert callback.syncs == 2
    expected = ExampleAccountant(1.1, BATCH, len(x), 1e-5)
    expected.step(4)
    assert callback.example_epsilon == pytest.approx(expected.epsilon)
    assert registry.get_sample_value("comind_worker_dp_epsilon") == pytest.approx(expected.epsilon)
    assert "train_step" not in model.__dict__  # fit without the callback trains as before
    with pytest.raises(ValueError, match="num_examples"):
        comind.FederatedAveraging(FakeClient([]), batch_size=BATCH, dp_example_clip=1.0,
                                  dp_example_noise_multiplier=1.0)


def test_comind_train_with_dp_sgd_reports_epsilon(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.random((640, *SHAPE), np.float32), y_train=np.arange(640) % CLASSES,
             x_test=rng.random((32, *SHAPE), np.float32), y_test=np.arange(32) % CLASSES)
    result = subprocess.run([sys.executable, "-m", "comind", "train", "--dataset", str(data), "--dp-example-clip",
                             "1", "--dp-example-noise-multiplier", "1.1", "--steps", "20", "--output-dir",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COMIND_METRICS_PORT": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "example-level DP epsilon" in result.stdout
    expected = ExampleAccountant(1.1, BATCH, 640, 1e-5)
    expected.step(20)
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]
    assert math.isfinite(final["example_epsilon"])
    assert final["example_epsilon"] == pytest.approx(expected.epsilon)


def test_comind_local_with_dp_sgd_trains_and_each_rounds_epsilon_is_the_chiefs_ledgers(tmp_path):
    """Two workers, 3 rounds of 10 steps: metrics.json's example_epsilon of round r is the chief's ledger after
    10 r steps of q = 32 / its examples; each worker logs its own."""
    rounds, interval, z = 3, 10, 1.1
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "comind", "local", "--workers", "2", "--rounds", str(rounds),
                             "--interval-steps", str(interval), "--eval-every", str(rounds), "--learning-rate",
                             "0.01", "--dp-example-clip", "1", "--dp-example-noise-multiplier", str(z),
                             "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COMIND_METRICS_PORT": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    logs = [(out / "logs" / f"worker-{task}.log").read_text() for task in range(2)]
    examples = [int(re.search(rf"Worker {task}: (\d+) training examples", log).group(1))
                for task, log in enumerate(logs)]
    assert sum(examples) == 1437  # the digits, split between the two
    epsilons = []
    for record in metrics["rounds"]:
        ledger = ExampleAccountant(z, BATCH, examples[0], 1e-5)
        ledger.step(record["round"] * interval)
        assert record["example_epsilon"] == pytest.approx(ledger.epsilon, rel=1e-9)
        assert record["epsilon"] is None  # no worker-level DP on the ps
        epsilons.append(record["example_epsilon"])
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    assert epsilons == sorted(set(epsilons))  # every round spends
    written = tensorboard_scalars(out / "tensorboard")["privacy/example_epsilon"]
    assert written == pytest.approx(dict(enumerate(epsilons, start=1)), rel=1e-6)  # as float32
    for task, log in enumerate(logs):
        ledger = ExampleAccountant(z, BATCH, examples[task], 1e-5)
        ledger.step(rounds * interval)
        assert f"example-level DP epsilon {ledger.epsilon:.4g} at delta 1e-05 after {rounds * interval} steps" in log
    # It trains: the noised steps take the global model well past chance (0.1) on the 360 test digits (0.54 to
    # 0.73 in three runs).
    assert metrics["final"]["eval_accuracy"] > 0.3


def by_definition(model: keras.Model, x: np.ndarray, y: np.ndarray, clip: float) -> np.ndarray:
    """Abadi et al.'s step without noise, one example at a time: each gradient clipped to ``clip``, summed, over B."""
    total = 0.0
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x[i:i + 1], y=y[i:i + 1], y_pred=model(x[i:i + 1], training=True))
        own = flat(tape.gradient(loss, model.trainable_variables))
        total = total + own * min(1.0, clip / np.linalg.norm(own))
    return total / len(x)


def test_the_custom_loop_wrapper_takes_dp_sgds_step_as_defined():
    """One example's gradient is thousands of times C: the wrapper's step is the definition's, each example clipped."""
    clip, learning_rate = 0.5, 0.1
    model, (x, y) = basic(), batch()
    x[0] *= 1e4
    wrapper = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(learning_rate), model,
                                                 FakeClient(model.get_weights()), interval_steps=2,
                                                 num_examples=4 * BATCH, batch_size=BATCH, dp_example_clip=clip,
                                                 dp_example_noise_multiplier=0.0)
    wrapper.start()
    before = flat(v.numpy() for v in model.trainable_variables)
    expected = by_definition(model, x, y, clip)
    huge = ExampleLevelPrivacy(clip, 0.0).per_example(model, x[:1], y[:1])[0]
    assert np.linalg.norm(flat(huge)) > 1000 * clip
    loss = wrapper.train_step(x, y)
    step = before - flat(v.numpy() for v in model.trainable_variables)
    np.testing.assert_allclose(step, learning_rate * expected, rtol=1e-4, atol=1e-7)
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="train_step"):
        wrapper.apply([np.zeros(v.shape) for v in model.trainable_variables])


def test_the_custom_loop_wrappers_ledger_and_noise():
    clip, z = 1.0, 1.1
    model, (x, y) = basic(), batch()
    registry, client = CollectorRegistry(), FakeClient(basic().get_weights())
    wrapper = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(1.0), model, client, interval_steps=2,
                                                 metrics=WorkerMetrics(registry), num_examples=4 * BATCH,
                                                 batch_size=BATCH, dp_example_clip=clip, dp_example_noise_multiplier=z)
    wrapper.start()
    before = flat(v.numpy() for v in model.trainable_variables)
    wrapper.train_step(x, y)
    noise = before - flat(v.numpy() for v in model.trainable_variables) - by_definition(model_at(before), x, y, clip)
    assert np.std(noise) == pytest.approx(z * clip / BATCH, rel=0.03)  # SGD at 1: the step is the gradient
    for _ in range(3):
        wrapper.train_step(x, y)
    wrapper.finish()
    assert len(client.pushed) == 2  # a sync every 2 steps
    expected = ExampleAccountant(z, BATCH, 4 * BATCH, 1e-5)
    expected.step(4)
    assert wrapper.example_epsilon == pytest.approx(expected.epsilon)
    assert registry.get_sample_value("comind_worker_dp_epsilon") == pytest.approx(expected.epsilon)


def model_at(weights: np.ndarray) -> keras.Model:
    """The basic model with its trainable variables at ``weights`` (flat)."""
    model = basic()
    offset = 0
    for variable in model.trainable_variables:
        size = int(np.prod(variable.shape))
        variable.assign(weights[offset:offset + size].reshape(variable.shape))
        offset += size
    return model


@pytest.mark.parametrize("flags, message", [
    ({"dp_example_clip": 1.0, "dp_example_noise_multiplier": 1.0}, "num_examples"),
    ({"dp_example_clip": 1.0, "dp_example_noise_multiplier": 1.0, "num_examples": 64, "batch_size": 32,
      "compiled": False}, "compile the model"),
    ({}, "train_step is example-level DP-SGD's step")])
def test_the_custom_loop_wrapper_refuses_dp_sgd_it_cannot_run(flags, message):
    compiled = flags.pop("compiled", True)
    model = basic() if compiled else keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(),
                                                       keras.layers.Dense(CLASSES)])
    with pytest.raises(ValueError, match=message):
        wrapper = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(), model, FakeClient(model.get_weights()),
                                                     **flags)
        wrapper.start()
        wrapper.train_step(*batch(4))
