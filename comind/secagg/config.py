"""The ps's secure-aggregation settings, and what they make of a round of n parties."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from comind.secagg import graph

if TYPE_CHECKING:
    from comind.privacy import DistributedNoise

#: Each value of an update lies in [-c, c] by default; the ps's --secagg-clip-range changes it.
DEFAULT_CLIP_RANGE = 4.0


@dataclasses.dataclass(frozen=True)
class SecAggSettings:
    """Args:
        threshold: the fraction of each party's share holders (itself and its neighbours) needed to rebuild its
            secrets, above one half so that no minority can; None: the smallest majority.
        neighbours: k, each party's neighbours (an even number); None: everyone in rounds of up to
            :data:`graph.COMPLETE_UP_TO` parties, else about 3 log2 n (SecAgg+).
        clip_range: c, the bound on every value of an update (the fixed-point encoding's range).
        max_update_norm: the bound on each update's L2 norm, which the workers apply before masking; None: none.
        noise: worker-level differential privacy's clip and noise, which the workers apply before masking; None: off.
    """

    threshold: float | None = None
    neighbours: int | None = None
    clip_range: float = DEFAULT_CLIP_RANGE
    max_update_norm: float | None = None
    noise: DistributedNoise | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.5 < self.threshold <= 1:
            raise ValueError(f"COMIND_SECAGG_THRESHOLD must be above 0.5 and at most 1 (a fraction of each party's "
                             f"share holders: a minority must not rebuild its secrets). Received: "
                             f"threshold={self.threshold!r}")
        if self.neighbours is not None:
            graph.check_degree(self.neighbours)
        if not (self.clip_range > 0 and math.isfinite(self.clip_range)):
            raise ValueError(f"COMIND_SECAGG_CLIP_RANGE must be a positive number. Received: "
                             f"clip_range={self.clip_range!r}")

    def degree(self, num_parties: int) -> int:
        """k for a round of ``num_parties``."""
        k = graph.default_degree(num_parties) if self.neighbours is None else self.neighbours
        return min(k, num_parties - 1)

    def shares_needed(self, group: int) -> int:
        """t for secrets shared among ``group`` holders."""
        return minimum_threshold(group) if self.threshold is None else max(minimum_threshold(group),
                                                                           math.ceil(self.threshold * group))


def minimum_threshold(group: int) -> int:
    """The smallest majority of ``group``: fewer shares than this never rebuild a secret."""
    return group // 2 + 1
