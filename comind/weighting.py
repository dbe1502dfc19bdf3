"""How much each update counts in a round's weighted mean.

``examples`` weights a worker by its number of training examples, as
McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks
from Decentralized Data") and Flower do; ``uniform`` counts every update
once.
"""

from __future__ import annotations

from collections.abc import Callable

from comind.registry import Registry

Weighting = Callable[[int], float]

WEIGHTINGS: Registry[Weighting] = Registry("COMIND_WEIGHTING")


@WEIGHTINGS.register("examples")
def by_examples(num_examples: int) -> float:
    return float(num_examples)


@WEIGHTINGS.register("uniform")
def uniform(num_examples: int) -> float:
    return 1.0
