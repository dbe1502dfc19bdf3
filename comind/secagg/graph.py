"""Who masks with whom: the round's neighbour graph, the same for every party that knows the round's seed.

Small rounds use the complete graph (Bonawitz et al. 2017). Large ones use
SecAgg+'s random k-regular graph (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead"): a Harary graph H(k, n),
each party joined to the k/2 nearest on each side of a ring, with the
parties placed on the ring in an order drawn from the seed by a stream
cipher, so that no one chooses their neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Rounds of up to this many parties use the complete graph by default.
COMPLETE_UP_TO = 20


def default_degree(num_parties: int) -> int:
    """k: everyone for small rounds, else the even number at least 3 log2 n (SecAgg+'s O(log n))."""
    if num_parties <= COMPLETE_UP_TO:
        return num_parties - 1
    k = math.ceil(3 * math.log2(num_parties))
    return min(num_parties - 1, k + k % 2)


def check_degree(degree: int) -> None:
    if degree < 2 or degree % 2:
        raise ValueError(f"COMIND_SECAGG_NEIGHBOURS must be an even number of at least 2 (each party joins the "
                         f"k/2 nearest on each side of a ring). Received: neighbours={degree}")


def neighbours(parties: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Each party's neighbours: everyone else if ``degree`` >= n - 1, else a random ``degree``-regular graph."""
    n = len(parties)
    if degree >= n - 1:
        return {p: frozenset(q for q in parties if q != p) for p in parties}
    check_degree(degree)
    # Here, not at the top: the settings' checks (config.py) run on a ps without the secagg extra, to say it is missing.
    from comind.secagg import primitives

    ring = primitives.shuffled(sorted(parties), seed)
    half = degree // 2
    return {p: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d) for i, p in enumerate(ring)}
