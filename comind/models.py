"""The classifiers of the original tutorials, and a user's own by ``module:function``.

Models take float inputs scaled to [0, 1] (see :func:`comind.worker.prepare`).
The built-in ones end in a softmax over the classes; a user's may end in
logits instead (see :func:`build`).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import keras
from keras import layers, ops

from comind.model_names import BUILTIN as BUILTIN  # written there, so that settings know them without Keras

log = logging.getLogger(__name__)

#: Activations of a last layer whose outputs are probabilities already, for the loss to take as they are.
PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def basic(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The basic tutorial's classifier: Flatten, Dense 128 relu, Dense softmax."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="basic")


@keras.saving.register_keras_serializable(package="comind")
class PerImageStandardization(layers.Layer):
    """``tf.image.per_image_standardization``: zero mean, unit variance per image."""

    def call(self, images: Any) -> Any:  # a backend tensor
        axes = tuple(range(1, len(images.shape)))
        mean = ops.mean(images, axis=axes, keepdims=True)
        std = ops.std(images, axis=axes, keepdims=True)
        pixels = math.prod(images.shape[1:])
        return (images - mean) / ops.maximum(std, 1.0 / math.sqrt(pixels))


@keras.saving.register_keras_serializable(package="comind")
class TrainingCrop(layers.Layer):
    """A random crop in training and the central crop at inference, as the original tutorial's
    ``tf.random_crop`` and ``resize_image_with_crop_or_pad`` were.

    Keras 3's ``RandomCrop`` passes images through whole at inference, so the
    layers after it would see another shape than they were built for (a
    32x32 image flattens to 4,096 values where the dense layer expects 2,304).
    """

    def __init__(self, height: int, width: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.height, self.width = height, width
        self.random = layers.RandomCrop(height, width)
        self.center = layers.CenterCrop(height, width)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.random.build(input_shape)
        self.center.build(input_shape)
        super().build(input_shape)

    def call(self, images: Any, training: bool | None = None) -> Any:
        return self.random(images, training=True) if training else self.center(images)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "height": self.height, "width": self.width}


def advanced(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The advanced tutorial's CIFAR-10 CNN, with its augmentation.

    Random crop (24 of 32 pixels; the central crop at inference), horizontal
    flip, brightness and contrast jitter, per-image standardisation; then two
    5x5 convolutions of 64 filters with 3x3 max pooling, and dense layers of
    384 and 192. The original's local response normalisation is left out:
    Keras has no such layer, and it adds little to accuracy.
    """
    height, width = input_shape[:2]
    crop_height, crop_width = max(1, height * 3 // 4), max(1, width * 3 // 4)
    stack = [keras.Input(input_shape)]
    if len(input_shape) == 2:  # grayscale without a channel axis
        stack.append(layers.Reshape((height, width, 1)))
    stack += [
        TrainingCrop(crop_height, crop_width),
        layers.RandomFlip("horizontal"),
        layers.RandomBrightness(63 / 255, value_range=(0.0, 1.0)),
        layers.RandomContrast(0.8),  # contrast factor in [0.2, 1.8], as the original
        PerImageStandardization(),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(3, strides=2, padding="same"),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(3, strides=2, padding="same"),
        layers.Flatten(),
        layers.Dense(384, activation="relu"),
        layers.Dense(192, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ]
    return keras.Sequential(stack, name="advanced")


def build(spec: str, input_shape: tuple[int, ...], num_classes: int, learning_rate: float = 1e-3,
          optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    """A compiled model: ``basic``, ``advanced``, or ``module:function``.

    It is compiled with ``optimizer``, or else Adam at ``learning_rate``.

    A user's ``function(input_shape, num_classes)`` returns a Keras model; if
    it is not compiled, it is compiled like the built-in ones (Adam, sparse
    categorical cross-entropy, accuracy), with ``from_logits=True`` unless
    its last layer ends in a softmax or a sigmoid: a model ending in a plain
    ``Dense(num_classes)`` outputs logits, and a loss that took them for
    probabilities would train it badly. A model compiled by its function
    keeps its own loss.
    """
    if spec in BUILTIN:
        model = globals()[spec](tuple(input_shape), num_classes)
    else:
        model = _user_model(spec)(tuple(input_shape), num_classes)
        if not isinstance(model, keras.Model):
            raise ValueError(f"The model function must return a keras.Model; it returned a "
                             f"{type(model).__name__}. Received: model={spec!r}")
    if model.compiled and optimizer is not None and type(model.optimizer) is not type(optimizer):
        raise ValueError(f"{spec} returned a model compiled with {type(model.optimizer).__name__}, but this mode "
                         f"trains it with {type(optimizer).__name__}: return it uncompiled, or compiled with that "
                         f"optimizer. Received: optimizer={type(model.optimizer).__name__}")
    if not model.compiled:
        from_logits = not _ends_in_probabilities(model)
        if from_logits:
            log.info("The last layer of model %s has no softmax or sigmoid, so its outputs are taken for logits "
                     "(from_logits=True); compile the model in %s to choose its loss yourself.", model.name, spec)
        model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), metrics=["accuracy"])
    return model


def _ends_in_probabilities(model: keras.Model) -> bool:
    """Whether the model's last layer is a softmax, or has a softmax or sigmoid activation."""
    last = model.layers[-1] if model.layers else None
    activation = getattr(last, "activation", None)
    return isinstance(last, layers.Softmax) or getattr(activation, "__name__", None) in PROBABILITY_ACTIVATIONS


def _user_model(spec: str) -> Callable[[tuple[int, ...], int], object]:
    module_name, _, function_name = spec.partition(":")
    if not (module_name and function_name):
        raise ValueError(f"Unknown model: use one of {', '.join(BUILTIN)}, or module:function for your own. "
                         f"Received: model={spec!r}")
    # `python -m comind` finds modules in the current directory; the `comind` script should too.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"Cannot import the model's module {module_name!r} ({error}); make it importable "
                         f"(PYTHONPATH) or fix the name. Received: model={spec!r}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"Module {module_name!r} has no function {function_name!r}. Received: model={spec!r}")
    return function
