"""How workers train between rounds, and what their updates are.

* ``federated`` (the default): each worker takes ``interval_steps`` local
  steps with its own optimizer, and its update is the change of its weights
  (federated averaging, McMahan et al. 2017).
* ``distributed``: the original tutorials' distributed classifiers, exactly.
  Every round is one step: a worker computes the gradient ``g_k`` of its
  batch's mean loss and sends ``-g_k`` (the change one SGD step at learning
  rate 1 would make), weighted by its batch size; the round's mean is then
  minus the gradient of the loss on the workers' batches together, and one
  Adam on the ps, whose moments never leave it, applies it. That is TF1's
  ``SyncReplicasOptimizer(Adam)``, and one process training on the combined
  batch (docs/design.md, decision 14).

This module needs neither NumPy nor Keras: the settings read it.
"""

from __future__ import annotations

import math

FEDERATED, DISTRIBUTED = "federated", "distributed"
MODES = (FEDERATED, DISTRIBUTED)

#: The ps's optimizer in each mode, unless told otherwise.
FEDERATED_SERVER_OPTIMIZER, DISTRIBUTED_SERVER_OPTIMIZER = "fedavg", "fedadam"
#: Keras's Adam defaults: the mode equals one process training with ``keras.optimizers.Adam``.
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-7
#: The learning rate the original's distributed classifiers scaled by the square root of the workers.
ORIGINAL_LEARNING_RATE = 1e-3


def distributed_learning_rate(num_workers: int) -> float:
    """The original's rule for the ps's Adam: ``sqrt(workers) x 0.001``, as its combined batch grows with them."""
    return math.sqrt(num_workers) * ORIGINAL_LEARNING_RATE
