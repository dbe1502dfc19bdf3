"""Worker-level differential privacy on the ps: DP-FedAvg with a fixed or adaptive clip.

Each round (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"):

1. every update (a worker's change, decoded and checked) is clipped to L2
   norm C, and counts once: each worker's influence on the sum is at most C;
2. the sum gets Gaussian noise of std ``z C`` in every coordinate, drawn from
   the operating system's cryptographically secure generator
   (:func:`secure_normal`);
3. it is divided by m, the number of updates a round expects, fixed by the
   settings rather than the count received (which would itself depend on
   who took part): with client sampling, q N, q the Poisson sampling rate and
   N the workers expected; a round whose draw selected no one releases the
   noise alone over m.

With ``--dp-clip adaptive`` C follows a quantile of the update norms
(Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): b_k = 1 if ||d_k|| <= C, b = (sum b_k + N(0, s_b^2)) / m,
C <- C exp(-eta_C (b - gamma)), and the update noise becomes
z_D = (z^-2 - (2 s_b)^-2)^-1/2 so that the two releases together cost what z
alone would. Non-floating-point tensors (counters) cannot be clipped, so no
change of theirs is released: their aggregate change is 0.

Every round's release is entered in the ledger (``accountant.py``) before
the noised aggregate exists; the clip and the ledger are saved with the model
and restored on resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from comind.accountant import ACCOUNTANTS, Ledger
from comind.aggregation import RunningWeightedSum
from comind.robust import clip_update
from comind.tensors import Layout

log = logging.getLogger(__name__)

ADAPTIVE = "adaptive"
#: Andrew et al. 2021's defaults: initial clip, target quantile, clip learning rate, count noise over m.
INITIAL_CLIP, TARGET_QUANTILE, CLIP_LEARNING_RATE, COUNT_NOISE_PER_UPDATE = 0.1, 0.5, 0.2, 1 / 20
#: Normal draws made at once: bounds the scratch memory of a large model's noise (8 bytes of entropy each).
NOISE_BLOCK = 1 << 20

#: ``(std, count)`` -> ``count`` independent draws of N(0, std^2), float64.
Normal = Callable[[float, int], np.ndarray]


def secure_normal(std: float, count: int) -> np.ndarray:
    """``count`` draws of N(0, std^2) from the kernel's CSPRNG (``os.urandom``), by Box-Muller.

    No seed exists to leak, reuse or fix: the noise is what protects each
    worker, and a statistical generator (NumPy's PCG64 or MT19937) is
    predictable from its outputs. Uniforms carry 53 random bits each.
    """
    out = np.empty(count, np.float64)
    for start in range(0, count, NOISE_BLOCK):
        n = min(NOISE_BLOCK, count - start)
        pairs = (n + 1) // 2
        bits = np.frombuffer(os.urandom(16 * pairs), np.uint64) >> np.uint64(11)
        uniform = (bits.astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]: the logarithm is finite
        radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
        angle = 2.0 * np.pi * uniform[pairs:]
        block = np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:n]
        out[start:start + n] = block * std
    return out


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """Worker-level DP's settings.

    Args:
        noise_multiplier: z: the noise's std over the clip, for the round as a whole.
        clip: C, fixed; None for adaptive clipping from ``initial_clip``.
        expected_updates: m, the fixed denominator: the updates a round expects (q N under Poisson sampling,
            not necessarily a whole number).
        delta: the delta epsilon is given at.
        accountant: ``rdp`` or ``pld``.
        target_epsilon: the budget: training ends at the last round within it; None for no end but the rounds.
    """

    noise_multiplier: float
    clip: float | None
    expected_updates: float
    initial_clip: float = INITIAL_CLIP
    target_quantile: float = TARGET_QUANTILE
    clip_learning_rate: float = CLIP_LEARNING_RATE
    delta: float = 1e-5
    accountant: str = "rdp"
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"The noise multiplier must be a finite number >= 0. "
                             f"Received: noise_multiplier={self.noise_multiplier!r}")
        for name in ("clip", "initial_clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive, finite number. Received: {name}={value!r}")
        if not (math.isfinite(self.expected_updates) and self.expected_updates > 0):
            raise ValueError(f"expected_updates must be positive. Received: expected_updates={self.expected_updates}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be between 0 and 1. Received: {self.target_quantile!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}. Received: {self.accountant!r}")

    @property
    def adaptive(self) -> bool:
        return self.clip is None

    @property
    def count_noise(self) -> float:
        """s_b, the std of the noise on the count of unclipped updates: m / 20 when adaptive and noised."""
        return COUNT_NOISE_PER_UPDATE * self.expected_updates if self.adaptive and self.noise_multiplier else 0.0

    @property
    def update_noise_multiplier(self) -> float:
        """z_D, the update noise's multiplier: z, or more when adaptive clipping's count takes a share."""
        z, s_b = self.noise_multiplier, self.count_noise
        if not s_b:
            return z
        share = z**-2 - (2 * s_b) ** -2
        if share <= 0:
            raise ValueError(
                f"Adaptive clipping spends part of the privacy budget on the count of unclipped updates (noise std "
                f"s_b = m/20 = {s_b:g}), and with {self.expected_updates} updates a round that part exceeds the "
                f"whole of noise multiplier {z:g}: it needs 2 s_b > z, i.e. more than {math.floor(10 * z)} updates a "
                f"round. Use a fixed --dp-clip, or more workers a round. Received: noise_multiplier={z!r}, "
                f"expected_updates={self.expected_updates}")
        return float(share**-0.5)


#: Under distributed noise the fixed-point range must reach this many of a worker's noise std beyond C: a value
#: past it (then an error, not a clamp that would bend the Gaussian) has probability under 2e-23.
NOISE_TAIL = 10.0


@dataclasses.dataclass(frozen=True)
class DistributedNoise:
    """Worker-level DP under secure aggregation: each worker clips and noises its own update before masking, since
    the ps sees only the sum (Kairouz et al. 2021, "The Distributed Discrete Gaussian Mechanism"; here the noise
    is continuous, drawn before the fixed-point encoding).

    Args:
        noise_multiplier: z, for the sum of ``expected_updates`` shares.
        clip: C, fixed (a worker cannot learn the others' norms that adaptive clipping follows).
        expected_updates: m: the fixed denominator, and the number of shares whose sum has std z C.
    """

    noise_multiplier: float
    clip: float
    expected_updates: float

    @property
    def share_std(self) -> float:
        """Each worker's noise std, z C / sqrt(m): m shares sum to the std z C of central DP-FedAvg."""
        return self.noise_multiplier * self.clip / math.sqrt(self.expected_updates)

    @property
    def needed_range(self) -> float:
        """The least fixed-point range that holds a clipped, noised value: C plus :data:`NOISE_TAIL` share stds."""
        return self.clip + NOISE_TAIL * self.share_std

    def noise(self, values: np.ndarray, normal: Normal = secure_normal) -> float:
        """Clips ``values`` (one flat float64 array: a worker's update) to C in place and adds its noise share;
        returns the norm before clipping."""
        norm = clip_update([values], self.clip)
        values += normal(self.share_std, values.size)
        return norm


class DpRound:
    """One round's updates: each clipped to the round's C and summed unweighted; the count of those within C."""

    def __init__(self, layout: Layout, clip: float, model: np.ndarray):
        self.layout = layout
        self.clip = clip
        self.model = model  # the global model the updates were trained from: its integer tensors stand
        self.unclipped = 0
        self._sum = RunningWeightedSum(layout)

    @property
    def count(self) -> int:
        return self._sum.count

    def add(self, update: Sequence[np.ndarray], weight: float) -> None:
        """Clips ``update`` in place and adds it. ``weight`` plays no part: each worker's influence is C at most."""
        if clip_update(update, self.clip) <= self.clip:
            self.unclipped += 1
        self._sum.add(update, 1.0)

    def sums(self) -> list[np.ndarray]:
        """The clipped updates' sums; zeros for a round without updates (a Poisson draw that selected no one)."""
        if not self.count:
            return [np.zeros(spec.shape, np.float64) for spec in self.layout.specs]
        return self._sum.sums()


class DpFedAvg:
    """The DP stage of the ps's round: clip, sum, noise, fixed denominator; its clip and ledger are its state.

    Args:
        settings: z, C, m and the accounting.
        normal: where the noise comes from; the default is the only one to use outside tests.
    """

    def __init__(self, settings: DpSettings, normal: Normal = secure_normal):
        self.settings = settings
        self.z_update = settings.update_noise_multiplier  # raises now if adaptive clipping cannot be afforded
        self.clip = settings.clip if settings.clip is not None else settings.initial_clip
        self.ledger = Ledger(settings.noise_multiplier, settings.delta, settings.accountant)
        self._normal = normal

    def start(self, layout: Layout, model: np.ndarray) -> DpRound:
        return DpRound(layout, self.clip, model)

    def affordable(self, sampled_fraction: float) -> bool:
        """Whether one more round sampling ``sampled_fraction`` stays within the target epsilon."""
        target = self.settings.target_epsilon
        return target is None or self.ledger.epsilon_after(sampled_fraction) <= target

    def record_distributed(self, shares: int, sampled_fraction: float) -> None:
        """Enters a round of distributed noise (:class:`DistributedNoise`) in the ledger, with the noise its sum
        holds: ``shares`` workers' shares of std z C / sqrt(m) make std z C sqrt(shares / m), so a round where
        some of the m expected dropped out is accounted at z sqrt(shares / m). More shares than m are accounted
        at z (erring on the side of spent)."""
        z, m = self.settings.noise_multiplier, self.settings.expected_updates
        effective = z * math.sqrt(min(shares, m) / m)
        if effective < z:
            log.warning("This round's sum holds the noise of %d workers, of %g expected (the others dropped out): "
                        "it is accounted at noise multiplier %.4g instead of %g.", shares, m, effective, z)
        self.ledger.record_round(sampled_fraction, noise_multiplier=effective)

    def release(self, round: DpRound, sampled_fraction: float) -> np.ndarray:
        """The round's noised aggregate, packed in its layout; the ledger records the round first.

        Args:
            round: the round's clipped sum.
            sampled_fraction: q, the fraction of the population the round sampled (for the ledger).
        """
        self.ledger.record_round(sampled_fraction)  # before any noised value exists: spent even if it is discarded
        m, clip = self.settings.expected_updates, round.clip
        if round.count > m and sampled_fraction == 1:  # a Poisson sample (q < 1) is larger than q N half the time
            log.warning("This round has %d updates, more than the %g expected (the fixed denominator): the "
                        "aggregate is their sum over %g. Set COMIND_NUM_WORKERS to the workers a round "
                        "takes.", round.count, m, m)
        std = self.z_update * clip
        packed = np.empty(round.layout.nbytes, np.uint8)
        views = zip(round.layout.views(packed), round.sums(), round.layout.views(round.model), strict=True)
        for out, total, held in views:
            if out.dtype.kind != "f":
                # Integer tensors (counters, seeds) cannot be clipped, so no worker's are released: the global
                # model's stand, as the server optimizer takes the aggregate's integer values.
                np.copyto(out, held)
                continue
            noised = total.astype(np.float64).reshape(-1)
            noised += self._normal(std, noised.size)
            np.divide(noised.reshape(out.shape), m, out=out, casting="same_kind")
        if self.settings.adaptive:
            self._adapt(round)
        return packed

    def _adapt(self, round: DpRound) -> None:
        """C <- C exp(-eta_C (b - gamma)), b the noised fraction of updates within C (Andrew et al. 2021)."""
        s = self.settings
        noise = float(self._normal(s.count_noise, 1)[0]) if s.count_noise else 0.0
        fraction = (round.unclipped + noise) / s.expected_updates
        self.clip = float(self.clip * math.exp(-s.clip_learning_rate * (fraction - s.target_quantile)))

    def state(self) -> dict[str, np.ndarray]:
        state = {f"ledger/{k}": v for k, v in self.ledger.state().items()}
        if self.settings.adaptive:
            state["clip"] = np.array(self.clip, np.float64)
        return state

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        ledger = {k.removeprefix("ledger/"): v for k, v in state.items() if k.startswith("ledger/")}
        if ledger:
            self.ledger.restore(ledger)
        if self.settings.adaptive and "clip" in state:
            clip = float(state["clip"])
            if not (math.isfinite(clip) and clip > 0):
                raise ValueError(f"The checkpoint's adaptive clip is not a positive number. Received: clip={clip!r}")
            self.clip = clip
