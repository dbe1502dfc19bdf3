"""Evaluating a classifier on held-out data, without disturbing ``model.fit``.

``model.evaluate`` would reset the metrics that a running ``fit`` reports,
so the chief evaluates by calling the model directly and computing the
compiled loss and the accuracy itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (or whatever the model outputs), in inference mode.

    ``predict_on_batch`` runs the model's compiled predict function (half
    the time of calling the model eagerly, for the basic model) and leaves
    the metrics of a running ``fit`` alone.
    """
    return np.concatenate([model.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024,
             loss: Callable[[Any, Any], Any] | None = None) -> tuple[float, float]:
    """The model's loss (``loss``, or the compiled one) and its accuracy on ``(x, y)``."""
    if loss is None:
        loss = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
    if loss is None:
        raise ValueError("Evaluating a model needs its loss: compile the model with one, or give the loss "
                         "function. Received: an uncompiled model and loss=None")
    outputs = predict(model, x, batch_size)
    value = float(np.mean(keras.ops.convert_to_numpy(loss(y, outputs))))
    accuracy = float(np.mean(np.argmax(outputs, axis=-1) == y.reshape(-1)))
    return value, accuracy
