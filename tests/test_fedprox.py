"""FedProx on the workers: each local step follows the gradient of L(w) + mu/2 ||w - x||^2 (Li et al. 2020).

A fake client stands in for the ps: it hands out a fixed global model ``x``
and records what the worker pushes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import comind
from comind.client import GlobalState

LEARNING_RATE, MU = 0.1, 0.5


class FakeClient:
    is_chief = True
    replicas_to_aggregate = None
    mode = "federated"
    federated_eval_every = 0

    def __init__(self, global_model: list[np.ndarray]):
        self.global_model = global_model
        self.pushed: list[list[np.ndarray]] = []

    def join(self, weights, names=None) -> GlobalState:
        return GlobalState([w.copy() for w in self.global_model], 0, False)

    def sync(self, weights, num_examples, loss=0.0, accuracy=0.0, change=None, evaluation=None) -> GlobalState:
        self.pushed.append([np.array(w) for w in weights])
        return GlobalState([w.copy() for w in self.global_model], len(self.pushed), False)


def model(regularizer: keras.regularizers.Regularizer | None = None) -> keras.Model:
    keras.utils.set_random_seed(1)
    built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, kernel_regularizer=regularizer)])
    built.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE), loss="mse")
    return built


def data(batches: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(8 * batches, 4)).astype(np.float32), rng.normal(size=(8 * batches, 3)).astype(np.float32)


def global_model() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.normal(scale=0.3, size=(4, 3)).astype(np.float32), rng.normal(scale=0.3, size=3).astype(np.float32)]


def gradient(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The gradient of the mean squared error alone at ``weights``, in float64."""
    kernel, bias = (w.astype(np.float64) for w in weights)
    error = x.astype(np.float64) @ kernel + bias - y
    scale = 2 / error.size
    return [scale * x.T @ error, scale * error.sum(axis=0)]


def test_one_sgd_step_of_the_custom_loop_wrapper_adds_mu_times_the_distance_from_the_global_model():
    net, anchor = model(), global_model()
    optimizer = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(LEARNING_RATE), net,
                                                   FakeClient(anchor), interval_steps=100,
                                                   proximal_mu=MU)  # type: ignore[arg-type]
    optimizer.start()
    moved = [w + np.float32(0.25) * np.sign(w) for w in anchor]  # local training moved away from x
    net.set_weights(moved)
    x, y = data(1)
    grads = [g.astype(np.float32) for g in gradient(moved, x, y)]  # of the loss alone, as a custom loop has them
    optimizer.apply(grads, num_examples=len(x))
    for after, w, x_t, g in zip(net.get_weights(), moved, anchor, gradient(moved, x, y), strict=True):
        expected = w - LEARNING_RATE * (g + MU * (w.astype(np.float64) - x_t))
        np.testing.assert_allclose(after, expected, rtol=0, atol=1e-7)


def fit(proximal_mu: float, steps: int = 2, regularizer: keras.regularizers.Regularizer | None = None,
        fitted_before: bool = False) -> tuple[keras.Model, FakeClient]:
    net, client = model(regularizer), FakeClient(global_model())
    x, y = data(steps)
    if fitted_before:  # fit has a training step already, made without the term
        net.fit(x, y, batch_size=8, verbose=0)
    callback = comind.FederatedAveraging(client, interval_steps=100, batch_size=8,  # type: ignore[arg-type]
                                         proximal_mu=proximal_mu)
    net.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    return net, client


@pytest.mark.parametrize("fitted_before", [False, True])
def test_model_fit_through_the_callback_follows_the_proximal_gradient(fitted_before):
    _, client = fit(MU, fitted_before=fitted_before)
    [pushed] = client.pushed  # the one sync at the end of fit
    x, y = data(2)
    anchor = global_model()
    # Step 1 starts at x itself, where the term's gradient is 0; step 2 starts at w1 != x.
    w1 = [w - LEARNING_RATE * g for w, g in zip(anchor, gradient(anchor, x[:8], y[:8]), strict=True)]
    w2 = [w - LEARNING_RATE * (g + MU * (w - x_t))
          for w, g, x_t in zip(w1, gradient(w1, x[8:], y[8:]), anchor, strict=True)]
    for after, expected in zip(pushed, w2, strict=True):
        np.testing.assert_allclose(after, expected, rtol=0, atol=1e-7)


def test_mu_zero_is_fedavg_bit_for_bit_and_a_positive_mu_is_not():
    _, fedavg = fit(0.0, steps=3)
    net, unset = model(), FakeClient(global_model())
    net.fit(*data(3), batch_size=8, shuffle=False, verbose=0,
            callbacks=[comind.FederatedAveraging(unset, interval_steps=100, batch_size=8)])  # type: ignore[arg-type]
    for mine, theirs in zip(fedavg.pushed[0], unset.pushed[0], strict=True):
        np.testing.assert_array_equal(mine, theirs)
    _, proximal = fit(MU, steps=3)
    assert not np.array_equal(proximal.pushed[0][0], fedavg.pushed[0][0])


def test_the_model_keeps_its_own_regularizers_during_and_after_fit():
    l2 = keras.regularizers.L2(0.01)
    net, _ = fit(MU, regularizer=l2)
    kernel, bias = net.trainable_variables
    assert kernel.regularizer is l2 and bias.regularizer is None
    # The next fit, without FedProx, trains without the term.
    net.fit(*data(1), batch_size=8, verbose=0)


def test_a_negative_mu_is_refused():
    with pytest.raises(ValueError, match=r"Received: proximal_mu=-0\.1"):
        comind.FederatedAveraging(FakeClient(global_model()), proximal_mu=-0.1)  # type: ignore[arg-type]
