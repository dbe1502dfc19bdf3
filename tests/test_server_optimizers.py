"""The server optimizers against their equations, by hand, over several steps; fedadam against Keras's Adam."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from comind.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizer, ServerOptimizerSettings
from comind.tensors import Layout

SCALAR = Layout.of([np.zeros((), np.float64)])


def run(optimizer: ServerOptimizer, layout: Layout, model: Sequence[np.ndarray],
        deltas: Sequence[Sequence[np.ndarray]]) -> tuple[list[list[np.ndarray]], dict[str, np.ndarray]]:
    """The model after each step, and the last state."""
    packed, state = layout.pack(model), optimizer.initial_state(layout)
    models = []
    for delta in deltas:
        packed, state = optimizer.step(layout, packed, layout.pack(delta), state)
        models.append([view.copy() for view in layout.views(packed)])
    return models, state


def scalar_run(name: str, deltas: Sequence[float], **settings: float) -> list[float]:
    optimizer = SERVER_OPTIMIZERS[name](ServerOptimizerSettings(**settings))
    models, _ = run(optimizer, SCALAR, [np.zeros(())], [[np.array(d)] for d in deltas])
    return [float(m[0]) for m in models]


def test_fedavg_adds_eta_times_the_aggregate():
    assert scalar_run("fedavg", [2.0, -1.0, 4.0]) == [2.0, 1.0, 5.0]
    assert scalar_run("fedavg", [2.0, -1.0, 4.0], learning_rate=0.5) == [1.0, 0.5, 2.5]


def test_fedavgm_by_hand():
    # v = mu v + D; x = x + eta v, with eta = mu = 0.5:
    # v 2, x 1;  v 1 + 4 = 5, x 1 + 2.5 = 3.5;  v 2.5 - 4 = -1.5, x 3.5 - 0.75 = 2.75.
    assert scalar_run("fedavgm", [2.0, 4.0, -4.0], learning_rate=0.5, momentum=0.5) == [1.0, 3.5, 2.75]


def test_fedadam_by_hand_is_bias_corrected_with_steps_from_one():
    # b1 = 0.5, b2 = 0.75, eta = 1, tau = 0. Bias-corrected, a constant D moves x by exactly eta a step:
    # t=1: m 1, v 1, correction sqrt(0.25) / 0.5 = 1, x 0 + 1 = 1.
    # t=2: m 1.5, v 1.75, m_hat 1.5 / 0.75 = 2, v_hat 1.75 / 0.4375 = 4, x 1 + 2 / 2 = 2.
    # t=3, D = -2: m -0.25, v 2.3125, m_hat -0.25 / 0.875 = -2/7, v_hat 2.3125 / 0.578125 = 4, x 2 - 1/7.
    steps = scalar_run("fedadam", [2.0, 2.0, -2.0], learning_rate=1.0, beta1=0.5, beta2=0.75, epsilon=0.0)
    np.testing.assert_allclose(steps, [1.0, 2.0, 2.0 - 1 / 7], rtol=1e-15)
    # tau is added to sqrt(v), not to sqrt(v_hat) (as Keras does): t=1 with tau = 1: 1 * 1 / (1 + 1).
    [first] = scalar_run("fedadam", [2.0], learning_rate=1.0, beta1=0.5, beta2=0.75, epsilon=1.0)
    assert first == 0.5


def test_fedyogi_by_hand():
    # b1 = 0.5, b2 = 0.75, eta = 1, tau = 0; v = v - (1 - b2) D^2 sign(v - D^2), no bias correction:
    # t=1, D 2: m 1, v 0 + 0.25 * 4 = 1, x 1.
    # t=2, D 1: m 1, v 1 (v = D^2: unchanged), x 2.
    # t=3, D 0.5: m 0.75, v 1 - 0.25 * 0.25 = 0.9375 (v > D^2: it shrinks by (1 - b2) D^2), x 2 + 0.75 / sqrt(0.9375).
    steps = scalar_run("fedyogi", [2.0, 1.0, 0.5], learning_rate=1.0, beta1=0.5, beta2=0.75, epsilon=0.0)
    np.testing.assert_allclose(steps, [1.0, 2.0, 2.0 + 0.75 / 0.9375**0.5], rtol=1e-15)


def test_fedadagrad_by_hand():
    # b1 = 0.5, eta = 1, tau = 1; v sums D^2:
    # t=1, D 3: m 1.5, v 9, x 1.5 / (3 + 1) = 0.375.  t=2, D 4: m 2.75, v 25, x 0.375 + 2.75 / 6 = 5/6.
    steps = scalar_run("fedadagrad", [3.0, 4.0], learning_rate=1.0, beta1=0.5, epsilon=1.0)
    np.testing.assert_allclose(steps, [0.375, 5 / 6], rtol=1e-15)


@pytest.mark.parametrize("name, learning_rate", [("fedavg", 1.0), ("fedavgm", 1.0), ("fedadam", 0.1),
                                                 ("fedyogi", 0.01), ("fedadagrad", 0.1)])
def test_default_learning_rates(name, learning_rate):
    assert SERVER_OPTIMIZERS[name](ServerOptimizerSettings()).learning_rate == learning_rate
    assert SERVER_OPTIMIZERS[name](ServerOptimizerSettings(learning_rate=0.3)).learning_rate == 0.3


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS.names())
def test_integer_tensors_take_the_aggregate_and_a_step_changes_nothing_it_is_given(name):
    layout = Layout.of([np.zeros(3, np.float32), np.zeros((), np.int64), np.zeros(2, np.float16)])
    optimizer = SERVER_OPTIMIZERS[name](ServerOptimizerSettings())
    model = layout.pack([np.ones(3, np.float32), np.array(5), np.ones(2, np.float16)])
    aggregate = layout.pack([np.full(3, 0.5, np.float32), np.array(9), np.full(2, 0.5, np.float16)])
    state = optimizer.initial_state(layout)
    before = (model.copy(), aggregate.copy(), {k: v.copy() for k, v in state.items()})
    packed, new_state = optimizer.step(layout, model, aggregate, state)
    floats, counter, halves = layout.views(packed)
    assert int(counter) == 9
    assert (floats > 1).all() and (halves > 1).all()
    assert not any(key.endswith("/00001") for key in new_state)  # no moments for the integer tensor
    assert all(new_state[key].dtype == np.float32 for key in new_state if key.endswith("/00002"))
    np.testing.assert_array_equal(model, before[0])
    np.testing.assert_array_equal(aggregate, before[1])
    assert state.keys() == before[2].keys()
    for key, value in state.items():
        np.testing.assert_array_equal(value, before[2][key])


def test_fedadam_is_keras_adam_stepping_on_minus_the_aggregate():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(7)
    initial = [rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    deltas = [[rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in initial] for _ in range(12)]
    settings = ServerOptimizerSettings(learning_rate=0.1, beta1=0.9, beta2=0.99, epsilon=1e-3)
    layout = Layout.of(initial)
    models, state = run(SERVER_OPTIMIZERS["fedadam"](settings), layout, initial, deltas)

    variables = [keras.Variable(w) for w in initial]
    adam = keras.optimizers.Adam(learning_rate=0.1, beta_1=0.9, beta_2=0.99, epsilon=1e-3)
    for delta, model in zip(deltas, models, strict=True):
        adam.apply([-d for d in delta], variables)
        for variable, mine in zip(variables, model, strict=True):
            np.testing.assert_allclose(mine, variable.numpy(), rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == int(adam.iterations) == 12
