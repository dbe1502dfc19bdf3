"""The per-update transform stage on the ps: a bound on each update's norm.

An update longer than ``--max-update-norm`` (its L2 norm over the
floating-point tensors) is scaled down to it, so that one worker moves the
mean by at most the bound over the number of workers (``robust.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from comind.robust import clip_update


class NormClip:
    """Scales each update down, in place, to ``max_norm`` if it is longer."""

    def __init__(self, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_update_norm must be positive, or unset for no bound. "
                             f"Received: max_update_norm={max_norm!r}")
        self.max_norm = max_norm

    def __call__(self, update: Sequence[np.ndarray]) -> float:
        """Clips ``update``; returns its norm before clipping."""
        return clip_update(update, self.max_norm)
