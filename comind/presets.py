"""How long each data set trains by default, without importing TensorFlow.

The ps and the workers must agree on the number of rounds; both derive it
from the same settings (data set and ``interval_steps``), so a cluster
configured only with ``COMIND_DATASET`` stops where its workers expect.
"""

from __future__ import annotations

import math

#: Local steps (batches) each worker trains by default, per data set.
STEPS = {"digits": 1500, "fashion_mnist": 6000, "cifar10": 20000}
#: For a user's own .npz data.
DEFAULT_STEPS = 2000


def default_rounds(dataset: str, interval_steps: int) -> int:
    """Rounds that give each worker its data set's default number of local steps."""
    return max(1, math.ceil(STEPS.get(dataset, DEFAULT_STEPS) / interval_steps))
