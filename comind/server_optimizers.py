"""The server-optimizer stage: how a round's aggregate update changes the global model.

The aggregate ``D`` is the round's mean (or median, or trimmed mean) of the
workers' deltas, the direction the workers moved in; an optimizer treats
``-D`` as a gradient (Reddi et al. 2021):

* ``fedavg``: ``x <- x + eta D``; with ``eta = 1`` the new model is the
  weighted mean of the workers' models (McMahan et al. 2017).
* ``fedavgm``: ``v <- mu v + D; x <- x + eta v`` (Hsu et al. 2019).
* ``fedadam``: Adam on ``-D``, as Keras computes it: bias-corrected, steps
  counted from 1, ``epsilon`` added to ``sqrt(v)``, so that it is exactly
  ``keras.optimizers.Adam`` stepping on ``-D``.
* ``fedyogi`` and ``fedadagrad``: Reddi et al.'s, without bias correction.

Integer and boolean tensors (step counters, seeds) travel as values, not
changes: the aggregate of their values replaces them, whatever the optimizer.

The math is in pure functions on NumPy arrays (:func:`momentum_step`,
:func:`adam_step`, :func:`yogi_step`, :func:`adagrad_step`); :class:`PerTensor`
applies one to each floating-point tensor of a packed model. A step is pure:
:meth:`ServerOptimizer.step` returns the new model and the new state without
changing the old ones, so a round whose result is refused (not finite) leaves
both as they were. The state (the step count ``step`` and the slots ``m/I``
and ``v/I`` of tensor ``I``) is saved with the model in every checkpoint, so
a restarted ps continues with the same moments.

References:
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan 2021,
    "Adaptive Federated Optimization", ICLR (Algorithm 2).
    Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification" (FedAvgM).
    Kingma and Ba 2015, "Adam: A Method for Stochastic Optimization".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from comind.registry import Registry
from comind.tensors import Layout

State = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ServerOptimizerSettings:
    """The server optimizers' hyperparameters; each optimizer reads those it has.

    Args:
        learning_rate: ``eta``; None: the optimizer's default (1.0 for fedavg and
            fedavgm, 0.1 for fedadam and fedadagrad, 0.01 for fedyogi, as in Reddi et
            al.'s experiments and Flower).
        momentum: fedavgm's ``mu``. 0.9, not Flower's 0.0, which makes FedAvgM FedAvg.
        beta1: decay of the first moment (fedadam, fedyogi, fedadagrad).
        beta2: decay of the second moment (fedadam, fedyogi).
        epsilon: ``tau``, added to ``sqrt(v)``; it bounds the step where ``v`` is small.
    """

    learning_rate: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-3


class ServerOptimizer(Protocol):
    #: ``eta``, the default resolved.
    learning_rate: float

    def initial_state(self, layout: Layout) -> dict[str, np.ndarray]: ...

    def step(self, layout: Layout, model: np.ndarray, aggregate: np.ndarray,
             state: State) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


SERVER_OPTIMIZERS: Registry[Callable[[ServerOptimizerSettings], ServerOptimizer]] = \
    Registry("COMIND_SERVER_OPTIMIZER")


# The math, one tensor at a time ---------------------------------------------------------------------------------


def momentum_step(x: np.ndarray, d: np.ndarray, v: np.ndarray, *, learning_rate: float,
                  momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """FedAvgM: ``v <- mu v + D; x <- x + eta v`` (heavy ball, no Nesterov).

    Returns:
        The new ``x`` and ``v``.

    References:
        Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
        Visual Classification".
    """
    v = momentum * v + d
    return x + learning_rate * v, v


def _first_moment(m: np.ndarray, d: np.ndarray, beta1: float) -> np.ndarray:
    return beta1 * m + (1 - beta1) * d


def _adaptive_move(x: np.ndarray, m: np.ndarray, v: np.ndarray, learning_rate: float,
                   epsilon: float) -> np.ndarray:
    return x + learning_rate * m / (np.sqrt(v) + epsilon)


def adam_step(x: np.ndarray, d: np.ndarray, m: np.ndarray, v: np.ndarray, step: int, *, learning_rate: float,
              beta1: float, beta2: float, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedAdam as Keras's Adam on ``-D``::

        m <- b1 m + (1 - b1) D
        v <- b2 v + (1 - b2) D^2
        x <- x + eta sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + tau)

    with ``t`` the step, counted from 1. Reddi et al.'s FedAdam is the same
    without the bias correction ``sqrt(1 - b2^t) / (1 - b1^t)``, which
    tends to 1: it only shortens the first steps, taken from moments still
    near their zero start. Flower 1.42's FedAdam corrects with ``t + 1``.

    Returns:
        The new ``x``, ``m`` and ``v``.

    References:
        Kingma and Ba 2015, "Adam: A Method for Stochastic Optimization" (the step size before section 2.1).
        Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.
    """
    m = _first_moment(m, d, beta1)
    v = beta2 * v + (1 - beta2) * d * d
    corrected = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    return _adaptive_move(x, m, v, corrected, epsilon), m, v


def yogi_step(x: np.ndarray, d: np.ndarray, m: np.ndarray, v: np.ndarray, *, learning_rate: float,
              beta1: float, beta2: float, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedYogi: Adam whose ``v`` moves towards ``D^2`` by at most ``(1 - b2) D^2`` a step::

        m <- b1 m + (1 - b1) D
        v <- v - (1 - b2) D^2 sign(v - D^2)
        x <- x + eta m / (sqrt(v) + tau)

    Returns:
        The new ``x``, ``m`` and ``v``.

    References:
        Zaheer, Reddi, Sachan, Kale and Kumar 2018, "Adaptive Methods for Nonconvex Optimization".
        Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.
    """
    m = _first_moment(m, d, beta1)
    squared = d * d
    v = v - (1 - beta2) * squared * np.sign(v - squared)
    return _adaptive_move(x, m, v, learning_rate, epsilon), m, v


def adagrad_step(x: np.ndarray, d: np.ndarray, m: np.ndarray, v: np.ndarray, *, learning_rate: float,
                 beta1: float, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedAdagrad: ``v`` sums every ``D^2``::

        m <- b1 m + (1 - b1) D
        v <- v + D^2
        x <- x + eta m / (sqrt(v) + tau)

    Flower 1.42's FedAdagrad fixes ``b1 = 0`` (``m = D``); Reddi et al. keep ``b1``.

    Returns:
        The new ``x``, ``m`` and ``v``.

    References:
        Duchi, Hazan and Singer 2011, "Adaptive Subgradient Methods for Online Learning and Stochastic
        Optimization".
        Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2.
    """
    m = _first_moment(m, d, beta1)
    v = v + d * d
    return _adaptive_move(x, m, v, learning_rate, epsilon), m, v


# The optimizers, on packed models --------------------------------------------------------------------------------


#: One tensor's step: ``(x, D, slots, t, eta)`` to the new ``x`` and the new slots, ``t`` counted from 1.
TensorStep = Callable[[np.ndarray, np.ndarray, Sequence[np.ndarray], int, float], tuple[np.ndarray, ...]]


class PerTensor:
    """A server optimizer that steps each floating-point tensor with its own slots (``m``, ``v``).

    Integer tensors take the aggregate's values. The state is the steps
    taken, ``step``, and each slot of each floating-point tensor ``I`` as
    ``SLOT/I`` (float32 at least: ``D^2`` underflows float16).

    Args:
        slots: the names of the slots.
        learning_rate: ``eta``.
        tensor_step: the step of one tensor.
    """

    def __init__(self, slots: tuple[str, ...], learning_rate: float, tensor_step: TensorStep):
        self.slots = slots
        self.learning_rate = learning_rate
        self._tensor_step = tensor_step

    def initial_state(self, layout: Layout) -> dict[str, np.ndarray]:
        state = {"step": np.zeros((), np.int64)}
        for i, spec in enumerate(layout.specs):
            if spec.dtype.kind == "f":
                state.update({f"{slot}/{i:05d}": np.zeros(spec.shape, _slot_dtype(spec.dtype))
                              for slot in self.slots})
        return state

    def step(self, layout: Layout, model: np.ndarray, aggregate: np.ndarray,
             state: State) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The new global model, packed, and the new state.

        Args:
            layout: the model's layout.
            model: the global model, packed.
            aggregate: the round's aggregate update, packed in the same layout.
            state: this optimizer's state, as :meth:`initial_state` or the last step made it.
        """
        t = int(state["step"]) + 1
        packed = np.empty(layout.nbytes, np.uint8)
        new_state = {"step": np.array(t, np.int64)}
        views = zip(layout.views(packed), layout.views(model), layout.views(aggregate), strict=True)
        for i, (out, weights, change) in enumerate(views):
            if out.dtype.kind != "f":
                np.copyto(out, change)
                continue
            keys = [f"{slot}/{i:05d}" for slot in self.slots]
            slots = [state[key] for key in keys]
            dtype = slots[0].dtype
            moved, *updated = self._tensor_step(weights.astype(dtype, copy=False), change.astype(dtype, copy=False),
                                                slots, t, self.learning_rate)
            np.copyto(out, moved, casting="same_kind")
            new_state.update(zip(keys, updated, strict=True))
        return packed, new_state


def _slot_dtype(dtype: np.dtype) -> np.dtype:
    return np.promote_types(dtype, np.float32)


def _eta(settings: ServerOptimizerSettings, default: float) -> float:
    return default if settings.learning_rate is None else settings.learning_rate


@SERVER_OPTIMIZERS.register("fedavg")
class FedAvg:
    """``x <- x + eta D`` for floating-point tensors; integer tensors take the aggregate's values.

    With ``eta = 1`` (the default) it adds ``D`` as before there was a
    learning rate, bit for bit. It keeps no state.
    """

    def __init__(self, settings: ServerOptimizerSettings = ServerOptimizerSettings()):
        self.learning_rate = _eta(settings, 1.0)

    def initial_state(self, layout: Layout) -> dict[str, np.ndarray]:
        return {}

    def step(self, layout: Layout, model: np.ndarray, aggregate: np.ndarray,
             state: State) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The new global model, packed, and the (empty) state; arguments as :meth:`PerTensor.step`."""
        packed = np.empty(layout.nbytes, np.uint8)
        views = zip(layout.views(packed), layout.views(model), layout.views(aggregate), strict=True)
        for out, weights, change in views:
            if out.dtype.kind != "f":
                np.copyto(out, change)
            elif self.learning_rate == 1.0:
                np.add(weights, change, out=out)
            else:
                np.add(weights, self.learning_rate * change, out=out)
        return packed, dict(state)


@SERVER_OPTIMIZERS.register("fedavgm")
def fedavgm(settings: ServerOptimizerSettings) -> PerTensor:
    """:func:`momentum_step`; ``eta`` defaults to 1.0."""
    return PerTensor(("v",), _eta(settings, 1.0), lambda x, d, slots, t, eta: momentum_step(
        x, d, slots[0], learning_rate=eta, momentum=settings.momentum))


@SERVER_OPTIMIZERS.register("fedadam")
def fedadam(settings: ServerOptimizerSettings) -> PerTensor:
    """:func:`adam_step`, Keras's Adam on ``-D``; ``eta`` defaults to 0.1."""
    b1, b2, tau = settings.beta1, settings.beta2, settings.epsilon
    return PerTensor(("m", "v"), _eta(settings, 0.1), lambda x, d, slots, t, eta: adam_step(
        x, d, slots[0], slots[1], t, learning_rate=eta, beta1=b1, beta2=b2, epsilon=tau))


@SERVER_OPTIMIZERS.register("fedyogi")
def fedyogi(settings: ServerOptimizerSettings) -> PerTensor:
    """:func:`yogi_step`; ``eta`` defaults to 0.01."""
    return PerTensor(("m", "v"), _eta(settings, 0.01), lambda x, d, slots, t, eta: yogi_step(
        x, d, slots[0], slots[1], learning_rate=eta, beta1=settings.beta1, beta2=settings.beta2,
        epsilon=settings.epsilon))


@SERVER_OPTIMIZERS.register("fedadagrad")
def fedadagrad(settings: ServerOptimizerSettings) -> PerTensor:
    """:func:`adagrad_step`; ``eta`` defaults to 0.1."""
    return PerTensor(("m", "v"), _eta(settings, 0.1), lambda x, d, slots, t, eta: adagrad_step(
        x, d, slots[0], slots[1], learning_rate=eta, beta1=settings.beta1, epsilon=settings.epsilon))
