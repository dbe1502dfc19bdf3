"""Federated averaging as a running weighted sum.

A round's aggregate is the weighted mean of the workers' updates (McMahan
et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"), each weighted as ``weighting.py`` says. Updates are
folded into one running sum as they arrive, so the ps holds O(model) memory
however many workers there are. The rules that outvote poisoned updates
instead are in ``robust.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from comind.tensors import Layout

#: Elements per step of the weighted add: the scaled block stays in cache,
#: so adding an update costs about one pass over memory, like a plain ``+=``.
BLOCK_ELEMENTS = 1 << 16

def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """Floats sum in their own precision (at least float32); others in float64."""
    if dtype.kind == "f":
        return np.result_type(dtype, np.float32)
    return np.dtype(np.float64)


class RunningWeightedSum:
    """Accumulates ``sum_i w_i * x_i`` and ``sum_i w_i`` one update at a time."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.total_weight = 0.0
        self.count = 0
        self._sums: list[np.ndarray] | None = None  # allocated at the first add
        self._blocks: dict[np.dtype, np.ndarray] = {}

    def add(self, tensors: Sequence[np.ndarray], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"An update needs a positive weight. Received: weight={weight}")
        if self._sums is None:
            self._sums = [np.zeros(s.shape, accumulator_dtype(s.dtype)) for s in self.layout.specs]
        for total, tensor in zip(self._sums, tensors, strict=True):
            block = self._blocks.get(total.dtype)
            if block is None:
                block = self._blocks[total.dtype] = np.empty(BLOCK_ELEMENTS, total.dtype)
            _add_scaled(total.reshape(-1), np.asarray(tensor).reshape(-1), weight, block)
        self.total_weight += weight
        self.count += 1

    def sums(self) -> list[np.ndarray]:
        """The running sums, one per tensor (the weighted mean is each over ``total_weight``); not reset."""
        if self._sums is None:
            raise ValueError("No update was added, so there is no sum to take.")
        return self._sums

    def result(self) -> np.ndarray:
        """The weighted mean, packed into a new buffer of the layout; resets the sum."""
        if self._sums is None:
            raise ValueError("No update was added, so there is no mean to take.")
        packed = np.empty(self.layout.nbytes, dtype=np.uint8)
        for out, total in zip(self.layout.views(packed), self._sums, strict=True):
            if out.dtype.kind == "f":
                np.divide(total, self.total_weight, out=out, casting="same_kind")
            else:
                np.copyto(out, np.rint(total / self.total_weight), casting="unsafe")
        self._sums, self.total_weight, self.count = None, 0.0, 0
        return packed


def _add_scaled(total: np.ndarray, values: np.ndarray, weight: float, block: np.ndarray) -> None:
    if weight == 1.0:
        np.add(total, values, out=total, casting="unsafe")
        return
    for start in range(0, total.size, BLOCK_ELEMENTS):
        stop = min(start + BLOCK_ELEMENTS, total.size)
        scaled = block[: stop - start]
        np.multiply(values[start:stop], weight, out=scaled, casting="unsafe")
        total[start:stop] += scaled
