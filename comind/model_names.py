"""The names of the built-in models, without importing Keras.

:mod:`comind.models` builds them (a function of the same name each) and
takes its list from here; the settings offer them as choices, and `comind
health`, which checks a worker's settings, never imports TensorFlow.
"""

from __future__ import annotations

#: The original tutorials' classifiers: the Fashion-MNIST MLP and the CIFAR-10 CNN.
BUILTIN = ("basic", "advanced")
