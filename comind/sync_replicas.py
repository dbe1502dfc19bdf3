"""The worker's side of distributed mode (:mod:`comind.modes`): gradients go to the ps, whose Adam applies them.

With ``model.fit``, compile the model with :class:`SyncReplicasOptimizer`:
it takes no step itself, but keeps each step's gradients for
:class:`comind.FederatedAveraging` to send, as TF1's
``SyncReplicasOptimizer`` sent them to the ps that held the Adam. The
custom-loop wrapper sends the gradients it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="comind")
class SyncReplicasOptimizer(keras.optimizers.Optimizer):
    """An optimizer whose steps the ps takes: it keeps each step's gradients, and leaves the weights alone.

    Compile a model with it for a ps in distributed mode; the
    ``FederatedAveraging`` callback sends each batch's gradients, and the
    ps's optimizer (Keras's Adam at ``sqrt(workers) x 0.001`` unless the ps
    is told otherwise) makes the step every worker then continues from.

    Example:
        >>> model.compile(optimizer=comind.SyncReplicasOptimizer(), loss="sparse_categorical_crossentropy")
        >>> model.fit(dataset.batch(32, drop_remainder=True), epochs=5,
        ...           callbacks=[comind.FederatedAveraging(client, batch_size=32)])
    """

    def __init__(self, name: str = "sync_replicas") -> None:
        # The learning rate is unused: no step is taken here.
        super().__init__(learning_rate=1.0, name=name)
        self._gradients: list[keras.Variable] = []
        self._owners: list[keras.Variable] = []

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}

    def build(self, variables: Sequence[keras.Variable]) -> None:
        if self.built:
            return
        super().build(variables)
        self._owners = list(variables)
        self._gradients = [self.add_variable_from_reference(variable, "gradient") for variable in variables]

    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        # A variable without a gradient this step must send none, not the last step's.
        for kept in self._gradients:
            kept.assign(keras.ops.zeros_like(kept))
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient: Any, variable: keras.Variable, learning_rate: Any) -> None:
        self.assign(self._gradients[self._get_variable_index(variable)], gradient)

    def gradients(self) -> dict[int, np.ndarray]:
        """The last step's gradient of each trainable variable, by the variable's ``id``."""
        return {id(owner): gradient.numpy() for owner, gradient in zip(self._owners, self._gradients, strict=True)}


def step_change(model: keras.Model, gradients: dict[int, np.ndarray],
                global_weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The update of one distributed step, for each of the model's weights in ``get_weights()`` order.

    A trainable variable's change is minus its gradient, exactly (one SGD
    step at learning rate 1, without the rounding of subtracting weights);
    any other floating-point weight (a moving statistic) changes as the
    step changed it; integer weights travel as values.

    Args:
        model: the model after the step.
        gradients: the step's gradients, by the ``id`` of their variables.
        global_weights: the global model the step was taken from.
    """
    change = []
    for variable, base in zip(model.weights, global_weights, strict=True):
        value = np.asarray(variable.numpy())
        if id(variable) in gradients:
            change.append(np.negative(gradients[id(variable)]).astype(value.dtype, copy=False))
        elif value.dtype.kind == "f":
            change.append(value - base)
        else:
            change.append(value)
    return change


def gradients_by_variable(gradients: Iterable[Any], variables: Iterable[keras.Variable]) -> dict[int, np.ndarray]:
    """Gradients given with their variables (a custom loop's), by the variables' ``id``; None: no change."""
    return {id(variable): np.asarray(keras.ops.convert_to_numpy(gradient))
            for gradient, variable in zip(gradients, variables, strict=True) if gradient is not None}
