"""A deterministic Fashion-MNIST-shaped data set that both systems read from one ``.npz`` file.

60,000 training and 10,000 test images of 28x28 ``uint8`` in 10 classes,
in the ``keras.datasets`` layout (``x_train``, ``y_train``, ``x_test``,
``y_test``) that ``comind --dataset PATH.npz`` reads. Generated rather than
downloaded, so the benchmark needs no network and every run sees the same
bytes.

Each class has a smooth prototype image; an example is its class's
prototype blended with a random other class's (up to 60 %) plus pixel noise.
Examples blended past half look more like the other class, so the basic
model learns quickly but stays well short of 100 %, as on Fashion-MNIST.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NUM_CLASSES = 10
TRAIN_EXAMPLES = 60_000
TEST_EXAMPLES = 10_000
MAX_BLEND = 0.6
NOISE = 2.0


def write(path: Path, seed: int = 0) -> Path:
    """Writes the data set to ``path`` (an ``.npz``) and returns the path."""
    rng = np.random.default_rng(seed)
    # Prototypes share a common pattern, so classes are alike and not separable at a glance.
    shared = _smooth_fields(rng, 1)
    prototypes = 0.5 * shared + 0.5 * _smooth_fields(rng, NUM_CLASSES)
    x_train, y_train = _examples(rng, prototypes, TRAIN_EXAMPLES)
    x_test, y_test = _examples(rng, prototypes, TEST_EXAMPLES)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _smooth_fields(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random 28x28 images made of 4x4 blocks."""
    return np.kron(rng.standard_normal((count, 7, 7), dtype=np.float32), np.ones((4, 4), np.float32))


def _examples(rng: np.random.Generator, prototypes: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, NUM_CLASSES, count)
    others = rng.integers(0, NUM_CLASSES, count)
    blend = rng.uniform(0.0, MAX_BLEND, count).astype(np.float32)[:, None, None]
    images = (1 - blend) * prototypes[labels] + blend * prototypes[others]
    images += NOISE * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(128 + 40 * images, 0, 255).astype(np.uint8), labels.astype(np.uint8)
