"""Example-level differential privacy on a worker: DP-SGD (Abadi et al. 2016).

Each local step:

1. every example's gradient, over all the model's trainable variables
   together, is computed at once (``tf.vectorized_map`` of a gradient tape:
   one batched computation, not a loop over the batch);
2. each is clipped to L2 norm C, so that no example moves the step by more
   than C over the batch size;
3. the clipped gradients are summed, Gaussian noise of std ``z C`` is added
   to every coordinate, and the sum is divided by the batch size;
4. the model's optimizer applies the result as it would any gradient.

The noise comes from TensorFlow's stateless normal op (Philox-4x32-10, a
counter-based generator, not a cryptographically secure one) keyed anew at
every step by 128 bits from :mod:`secrets`, drawn inside the step: no key is
stored, reused or sent. Drawing every coordinate from the kernel's CSPRNG as
the ps does (:func:`comind.privacy.secure_normal`) costs about 13 ms a step
for the basic model, several times the step itself. A fixed ``seed`` (tests
only) keys each step by ``(seed, step)`` instead: reproducible, and private
against nobody who knows it.

Accounting: each step is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, q
the batch size over the worker's examples, entered in a
:class:`comind.accountant.Ledger` of the worker's own. Keras's ``fit`` draws
shuffled batches of fixed size, not Poisson samples; they are accounted as
Poisson samples, as Opacus and TensorFlow Privacy account them by default.

References:
    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang 2016, "Deep
    Learning with Differential Privacy", CCS (algorithm 1).
    Mironov, Talwar and Zhang 2019, "Renyi Differential Privacy of the Sampled
    Gaussian Mechanism".
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from comind.accountant import Ledger

log = logging.getLogger(__name__)


def check(clip: float | None, noise_multiplier: float | None) -> bool:
    """Whether example-level DP is on; raises for one of the two without the other, or a value out of range."""
    if clip is None and noise_multiplier is None:
        return False
    if clip is None or noise_multiplier is None:
        raise ValueError(f"Example-level DP-SGD needs both a clip C (--dp-example-clip) and a noise multiplier z "
                         f"(--dp-example-noise-multiplier): noise without a clip hides an unbounded influence, and a "
                         f"clip without noise hides nothing. Received: dp_example_clip={clip!r}, "
                         f"dp_example_noise_multiplier={noise_multiplier!r}")
    if not clip > 0 or not noise_multiplier >= 0:
        raise ValueError(f"dp_example_clip must be > 0 and dp_example_noise_multiplier >= 0. "
                         f"Received: dp_example_clip={clip!r}, dp_example_noise_multiplier={noise_multiplier!r}")
    return True


def private_sum(per_example: Sequence[tf.Tensor], clip: float, noise_multiplier: float, batch_size: Any,
                seed: tf.Tensor) -> list[tf.Tensor]:
    """Each example's gradient clipped to L2 norm ``clip``, summed, noised with std ``z clip``, over ``batch_size``.

    Args:
        per_example: one tensor per variable, each of shape ``(batch, *variable.shape)``.
        clip: C, the bound on each example's gradient norm over all the variables together.
        noise_multiplier: z, the noise's std over C.
        batch_size: the denominator (a number or scalar tensor).
        seed: a shape ``(2,)`` integer tensor keying the stateless normal draws.
    """
    squares = [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g in per_example]
    norms = tf.sqrt(tf.add_n(squares))
    scale = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))
    seeds = tf.random.experimental.stateless_split(seed, num=len(per_example))
    denominator = tf.cast(batch_size, per_example[0].dtype)
    noised = []
    for i, g in enumerate(per_example):
        clipped = tf.tensordot(tf.cast(scale, g.dtype), g, axes=1)
        noise = tf.random.stateless_normal(tf.shape(clipped), seeds[i], stddev=noise_multiplier * clip,
                                           dtype=g.dtype)
        noised.append((clipped + noise) / denominator)
    return noised


def _secret_seed() -> np.ndarray:
    return np.array([secrets.randbits(63), secrets.randbits(63)], np.int64)


class ExampleLevelPrivacy:
    """DP-SGD's training step for a compiled Keras model: per-example clipping to ``clip``, noise of std ``z clip``.

    :meth:`install` makes ``model.fit`` train with it (the model keeps its
    optimizer, loss and metrics); :meth:`gradients` gives a custom training
    loop the same privatised gradients. Layers that mix examples
    (``BatchNormalization`` in training) have no per-example gradient: a model
    with them is not protected by it.

    Args:
        clip: C, the bound on each example's gradient's L2 norm over all trainable variables.
        noise_multiplier: z; the noise added to the batch's sum has std ``z C``.
        seed: None (the default) keys each step's noise from :mod:`secrets`; a number makes it reproducible, for
            tests only.
    """

    def __init__(self, clip: float, noise_multiplier: float, seed: int | None = None):
        check(clip, noise_multiplier)
        self.clip, self.noise_multiplier, self.seed = float(clip), float(noise_multiplier), seed

    def _step_seed(self, model: keras.Model) -> tf.Tensor:
        if self.seed is not None:
            step = tf.cast(tf.convert_to_tensor(model.optimizer.iterations), tf.int64)
            return tf.stack([tf.constant(self.seed, tf.int64), step])
        seed = tf.py_function(_secret_seed, [], tf.int64)
        seed.set_shape([2])
        return seed

    def per_example(self, model: keras.Model, x: Any, y: Any, sample_weight: Any = None) -> tuple[list, Any, Any]:
        """Each example's gradients (one tensor per trainable variable), losses and predictions, vectorised."""
        variables = model.trainable_variables

        def one(example: tuple) -> tuple:
            xi, yi, wi = (tf.nest.map_structure(lambda t: t[None], part) for part in example)
            with tf.GradientTape() as tape:
                prediction = model(xi, training=True)
                loss = model.compute_loss(x=xi, y=yi, y_pred=prediction, sample_weight=wi, training=True)
            gradients = tape.gradient(loss, variables)
            dense = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                     for g, v in zip(gradients, variables, strict=True)]
            return (dense, loss, tf.nest.map_structure(lambda t: t[0], prediction))

        weights = tf.ones(tf.shape(tf.nest.flatten(x)[0])[:1]) if sample_weight is None else sample_weight
        gradients, losses, predictions = tf.vectorized_map(one, (x, y, weights))
        return gradients, losses, predictions

    def gradients(self, model: keras.Model, x: Any, y: Any, sample_weight: Any = None) -> tuple[list, Any, Any]:
        """The step's privatised gradients (one per trainable variable), the per-example losses and predictions."""
        per_example, losses, predictions = self.per_example(model, x, y, sample_weight)
        batch_size = tf.shape(losses)[0]
        private = private_sum(per_example, self.clip, self.noise_multiplier, batch_size, self._step_seed(model))
        return private, losses, predictions

    def traced_gradients(self, model: keras.Model) -> Callable[..., tuple[list, Any, Any]]:
        """:meth:`gradients` of ``model`` as one traced TensorFlow function, for a custom loop: called eagerly,
        :func:`tf.vectorized_map` traces the per-example computation anew at every step (seconds each)."""
        return tf.function(lambda x, y, sample_weight=None: self.gradients(model, x, y, sample_weight),
                           reduce_retracing=True)

    def train_step(self, model: keras.Model, data: Any) -> Any:
        """Keras's TensorFlow ``train_step``, with DP-SGD's gradients."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        gradients, losses, predictions = self.gradients(model, x, y, sample_weight)
        model._loss_tracker.update_state(tf.reduce_mean(losses), sample_weight=tf.shape(losses)[0])
        model.optimizer.apply(gradients, model.trainable_variables)
        return model.compute_metrics(x, y, predictions, sample_weight=sample_weight)

    def install(self, model: keras.Model) -> None:
        """Makes ``model.fit`` train with DP-SGD's step (on this instance only), until :meth:`uninstall`."""
        if not model.compiled:
            raise ValueError("Example-level DP-SGD trains with the model's optimizer and loss: compile the model "
                             "first. Received: model.compiled=False")
        model.train_step = lambda data: self.train_step(model, data)
        if self.seed is None:
            model.jit_compile = False  # the secret key is drawn in Python, which XLA cannot call
        model.train_function = None  # the next fit makes one with this step

    @staticmethod
    def uninstall(model: keras.Model) -> None:
        model.__dict__.pop("train_step", None)
        model.train_function = None


class ExampleAccountant:
    """A worker's own privacy ledger for DP-SGD: each local step samples ``batch_size / num_examples`` of its data.

    Steps are counted as they happen and composed into epsilon when it is
    asked for (a composition costs about a millisecond).

    Args:
        noise_multiplier: z.
        batch_size: examples per step (the expected number, under Poisson sampling).
        num_examples: the worker's training examples.
        delta: the delta epsilon is given at; should be below 1 / ``num_examples``.
        accountant: ``rdp`` or ``pld``.
    """

    def __init__(self, noise_multiplier: float, batch_size: int, num_examples: int, delta: float,
                 accountant: str = "rdp"):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(f"Example-level DP-SGD's accounting needs the worker's number of training examples and "
                             f"its batch size. Received: num_examples={num_examples!r}, batch_size={batch_size!r}")
        self.sampled_fraction = min(1.0, batch_size / num_examples)
        self.ledger = Ledger(noise_multiplier, delta, accountant)
        self._pending = 0
        if delta >= 1 / num_examples:
            log.warning("DP-SGD's delta %g is not below 1 / %d examples: an epsilon at it allows a release of "
                        "whole records; lower --dp-delta.", delta, num_examples)

    def step(self, count: int = 1) -> None:
        self._pending += count

    @property
    def steps(self) -> int:
        return self.ledger.rounds + self._pending

    @property
    def epsilon(self) -> float:
        """Epsilon at delta after every step so far."""
        if self._pending:
            self.ledger.record_round(self.sampled_fraction, self._pending)
            self._pending = 0
        return self.ledger.epsilon

    def describe(self) -> str:
        epsilon = self.epsilon
        shown = "infinite (no noise)" if math.isinf(epsilon) else f"{epsilon:.4g}"
        return (f"example-level DP epsilon {shown} at delta {self.ledger.delta:g} after {self.steps} steps "
                f"(q {self.sampled_fraction:.4g}, z {self.ledger.noise_multiplier:g})")
