"""Fixed-point encoding of updates into the ring Z_{2^32}, where secure aggregation's masks live.

A value x in [-c, c] (c: the clipping range) becomes the integer
floor(x s + u), u uniform in [0, 1) (stochastic rounding: its mean is x s
exactly, so the sum stays unbiased), taken mod 2^32. The scale s is chosen
from the number of parties n so that a sum of n encodings never wraps:
each lies within c s + 1 of 0, and n (c s + 1) < 2^31, so the sum, read as
a signed 32-bit integer, is the exact sum of the integers.
"""

from __future__ import annotations

import numpy as np

from comind.secagg.errors import RangeExceeded
from comind.tensors import Layout

#: Elements of the ring: every masked input is 4 bytes per parameter.
RING_DTYPE = np.dtype("<u4")
SIGNED_DTYPE = np.dtype("<i4")
_HALF_RING = 2**31
#: Values encoded at a time: 256 KiB of float64 a buffer.
_BLOCK = 1 << 15


def scale(clip_range: float, num_parties: int) -> float:
    """s: encodings of ``num_parties`` values in [-clip_range, clip_range] sum within (-2^31, 2^31)."""
    if not clip_range > 0:
        raise ValueError(f"The clipping range must be positive. Received: clip_range={clip_range!r}")
    if num_parties < 1:
        raise ValueError(f"A round needs at least one party. Received: num_parties={num_parties}")
    return (_HALF_RING - 1 - num_parties) / (num_parties * clip_range)


def check_range(values: np.ndarray, clip_range: float) -> None:
    """Raises RangeExceeded if a value is outside [-clip_range, clip_range] or not finite."""
    flat = np.asarray(values).reshape(-1)
    # min and max, not max |x|: two passes that allocate nothing. A NaN fails both comparisons.
    if flat.size and not (-clip_range <= flat.min() and flat.max() <= clip_range):
        worst = float(np.max(np.abs(flat)))
        raise RangeExceeded(
            f"An update holds a value of magnitude {worst:.4g}, outside secure aggregation's clipping range "
            f"[-{clip_range:g}, {clip_range:g}], so the round's sum could wrap: raise COMIND_SECAGG_CLIP_RANGE on "
            f"the ps, or bound updates with COMIND_MAX_UPDATE_NORM (the worker clips before masking). "
            f"Received: max |value|={worst!r}")


def encode(values: np.ndarray, clip_range: float, num_parties: int, rng: np.random.Generator) -> np.ndarray:
    """``values`` (floats) as ring elements, stochastically rounded.

    ``rng`` draws only the rounding (it hides nothing); masks come from a stream cipher.

    Raises:
        RangeExceeded: a value is outside [-clip_range, clip_range] or not finite.
    """
    check_range(values, clip_range)
    flat = np.asarray(values, np.float64).reshape(-1)
    out = np.empty(flat.size, SIGNED_DTYPE)
    # A block at a time, through two buffers that stay in the CPU's cache: a temporary the model's size for each
    # step (scale, draw, add, floor, two casts) made the encoding cost nearly as much as all of a worker's masks.
    scaled, draws = np.empty(min(flat.size, _BLOCK)), np.empty(min(flat.size, _BLOCK))
    s = scale(clip_range, num_parties)
    for start in range(0, flat.size, _BLOCK):
        stop = min(start + _BLOCK, flat.size)
        x, u = scaled[:stop - start], draws[:stop - start]
        np.multiply(flat[start:stop], s, out=x)
        x += rng.random(out=u)
        np.floor(x, out=x)
        out[start:stop] = x  # |x| < 2^31 (scale): the cast to int32 is exact
    return out.view(RING_DTYPE)


def decode_sum(total: np.ndarray, clip_range: float, num_parties: int) -> np.ndarray:
    """The float sum that ring element ``total`` (a sum of at most ``num_parties`` encodings) stands for."""
    return np.asarray(total, RING_DTYPE).view(SIGNED_DTYPE).astype(np.float64) / scale(clip_range, num_parties)


def float_size(layout: Layout) -> int:
    """Values in a masked input: every value of the model's floating-point tensors."""
    return sum(spec.size for spec in layout.specs if spec.dtype.kind == "f")


def float_values(layout: Layout, packed: np.ndarray) -> np.ndarray:
    """The floating-point values of ``packed``, one flat float64 array: what a worker encodes and masks."""
    views = [v.reshape(-1) for v in layout.views(packed) if v.dtype.kind == "f"]
    return np.concatenate(views, dtype=np.float64) if views else np.zeros(0)
