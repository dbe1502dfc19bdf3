"""The task, as coMind defines it, for a process that cannot import coMind.

Flower 1.42 needs protobuf 6 and coMind protobuf 7, so Flower runs in its
own virtual environment, without coMind. The model and the data handling
here are coMind's: ``comind.models.basic`` compiled as
``comind.models.build`` compiles it, seeded as ``comind worker`` seeds it
(so both systems start from the same weights), and the contiguous split and
[0, 1] scaling of ``comind.sharding`` and ``comind.worker.prepare``.
"""

from __future__ import annotations

import keras
import numpy as np


def build_model(seed: int, learning_rate: float) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ], name="basic")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def load(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``x_{split}`` scaled to [0, 1] and ``y_{split}`` from the bench's ``.npz``."""
    with np.load(path, allow_pickle=False) as data:
        return data[f"x_{split}"].astype(np.float32) / 255.0, data[f"y_{split}"]


def partition(path: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Worker ``index``'s contiguous block of the training set, as ``--shard contiguous``."""
    x, y = load(path, "train")
    block = np.array_split(np.arange(len(y)), count)[index]
    return x[block], y[block]
