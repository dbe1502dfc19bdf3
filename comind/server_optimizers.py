"""The server-optimizer stage: how a round's aggregate update changes the global model.

``fedavg`` adds the aggregate to the global model, which makes the new
model the weighted mean of the workers' models (McMahan et al. 2017).
Integer and boolean tensors (step counters, seeds) travel as values, not
changes: the aggregate of their values replaces them.

An optimizer is pure: :meth:`ServerOptimizer.step` returns the new model and
the new state without changing the old ones, so a round whose result is
refused (not finite) leaves both as they were. The state is saved with the
model in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from comind.registry import Registry
from comind.tensors import Layout

State = Mapping[str, np.ndarray]


class ServerOptimizer(Protocol):
    def initial_state(self, layout: Layout) -> dict[str, np.ndarray]: ...

    def step(self, layout: Layout, model: np.ndarray, aggregate: np.ndarray,
             state: State) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


SERVER_OPTIMIZERS: Registry[Callable[[], ServerOptimizer]] = Registry("COMIND_SERVER_OPTIMIZER")


@SERVER_OPTIMIZERS.register("fedavg")
class FedAvg:
    """``x <- x + aggregate`` for floating-point tensors; integer tensors take the aggregate's values."""

    def initial_state(self, layout: Layout) -> dict[str, np.ndarray]:
        return {}

    def step(self, layout: Layout, model: np.ndarray, aggregate: np.ndarray,
             state: State) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The new global model, packed, and the new state.

        Args:
            layout: the model's layout.
            model: the global model, packed.
            aggregate: the round's aggregate update, packed in the same layout.
            state: this optimizer's state.
        """
        packed = np.empty(layout.nbytes, np.uint8)
        views = zip(layout.views(packed), layout.views(model), layout.views(aggregate), strict=True)
        for out, weights, change in views:
            if out.dtype.kind == "f":
                np.add(weights, change, out=out)
            else:
                np.copyto(out, change)
        return packed, dict(state)
