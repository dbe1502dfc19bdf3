"""The ps's side of a round, as a pipeline of named stages.

After an update is decoded (``encodings.py``: the encoding the ps
announced) and validated (``service.py``, ``ps.py``) it passes, in order:

1. **weighting** (``weighting.py``): what it counts for in the mean;
2. **per-update transforms** (``clipping.py``): the norm bound; with
   asynchronous rounds (``async_rounds.py``), then the staleness weight;
3. the **aggregator** (``aggregators.py``): mean, median or trimmed mean,
   into one aggregate update for the round; or, with worker-level
   differential privacy (``privacy.py``), the DP clip of each update, their
   sum, Gaussian noise and a fixed denominator, each round entered in the
   privacy ledger (``accountant.py``); with asynchronous rounds, over the
   buffer of the version, whose updates' ids are saved with it;
4. the **server optimizer** (``server_optimizers.py``): the aggregate
   changes the global model;

then the ps checks that the new model is finite, persists it with every
stage's state, and publishes it. Each choice is a registry entry; each
stage with state saves it under its own prefix in the checkpoint, so a
restarted ps continues exactly where it was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from comind import async_rounds, encodings, modes
from comind.aggregators import AGGREGATORS, AggregatorSettings, RoundAggregate
from comind.clipping import NormClip
from comind.privacy import DpFedAvg, DpRound, DpSettings
from comind.secagg.config import SecAggSettings
from comind.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizerSettings
from comind.tensors import Layout
from comind.weighting import WEIGHTINGS

log = logging.getLogger(__name__)

#: Where the DP stage's state (its clip and the privacy ledger) lies in the checkpoint.
DP_PREFIX = "dp/"

@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """The ps's choice for each stage, checked against the registries, and what an update is (:mod:`comind.modes`)."""

    mode: str = modes.FEDERATED
    weighting: str = "examples"
    aggregation: str = "mean"
    trim_fraction: float = 0.25
    max_update_norm: float | None = None
    server_optimizer: str = "fedavg"
    #: The server optimizer's hyperparameters (each optimizer reads those it has).
    server_optimizer_settings: ServerOptimizerSettings = dataclasses.field(default_factory=ServerOptimizerSettings)
    #: How updates come in, and how the model goes down (:mod:`comind.encodings`).
    update_encoding: str = encodings.FLOAT32
    model_encoding: str = encodings.FLOAT32
    #: Worker-level differential privacy; None: off.
    privacy: DpSettings | None = None
    #: Synchronous rounds, or asynchronous ones (:mod:`comind.async_rounds`).
    rounds_mode: str = async_rounds.SYNC
    #: Secure aggregation (``secure_rounds.py``); None: off.
    secure_aggregation: SecAggSettings | None = None

    def __post_init__(self) -> None:
        WEIGHTINGS[self.weighting], AGGREGATORS[self.aggregation], SERVER_OPTIMIZERS[self.server_optimizer]
        encodings.parse(self.update_encoding)
        if self.model_encoding not in encodings.MODEL_ENCODINGS:
            raise ValueError(f"model_encoding must be one of {', '.join(encodings.MODEL_ENCODINGS)}. Received: "
                             f"model_encoding={self.model_encoding!r}")
        if self.mode not in modes.MODES:
            raise ValueError(f"mode must be one of {', '.join(modes.MODES)}. Received: mode={self.mode!r}")
        self._check_rounds_mode()
        if self.secure_aggregation is not None:
            self._check_secure_aggregation()
        if self.privacy is None:
            return
        # DP bounds each worker's influence on a sum: C, if every update counts once and is clipped to C.
        if self.weighting != "uniform":
            raise ValueError(f"Worker-level differential privacy counts every update once (a weight by examples "
                             f"would let one worker's claim scale its influence past the clip); leave "
                             f"COMIND_WEIGHTING unset or set it to uniform. Received: weighting={self.weighting!r}")
        if self.aggregation != "mean":
            # One update moves a coordinate's median or trimmed mean by up to the gap between its neighbours,
            # in every coordinate at once: the sensitivity is not C, and noise calibrated to C would claim
            # an epsilon the release does not have.
            raise ValueError(f"Worker-level differential privacy adds noise to the sum of clipped updates, so it "
                             f"works with COMIND_AGGREGATION=mean only: a median's or trimmed mean's sensitivity to "
                             f"one worker is not bounded by the clip. Received: aggregation={self.aggregation!r}")
        if self.max_update_norm is not None:
            raise ValueError(f"Worker-level differential privacy clips each update to COMIND_DP_CLIP; unset "
                             f"COMIND_MAX_UPDATE_NORM, a second bound. Received: "
                             f"max_update_norm={self.max_update_norm!r}")

    def _check_rounds_mode(self) -> None:
        """Refuses what asynchronous rounds do not combine with."""
        if self.rounds_mode not in async_rounds.ROUNDS_MODES:
            raise ValueError(f"rounds_mode must be one of {', '.join(async_rounds.ROUNDS_MODES)}. Received: "
                             f"rounds_mode={self.rounds_mode!r}")
        if self.rounds_mode == async_rounds.SYNC:
            return
        if self.mode == modes.DISTRIBUTED:
            raise ValueError(f"Distributed mode averages every step's gradients of every worker in lockstep; "
                             f"asynchronous rounds are for federated mode. Set --rounds-mode sync or --mode "
                             f"federated. Received: mode={self.mode!r}, rounds_mode={self.rounds_mode!r}")
        if self.privacy is not None:
            # Its fixed denominator and its ledger count rounds of sampled workers, each in a round once.
            raise ValueError(f"Worker-level differential privacy accounts synchronous rounds (each worker in a round "
                             f"at most once, a fixed number of updates a round); asynchronous rounds have neither. "
                             f"Set --rounds-mode sync, or turn DP off. Received: rounds_mode={self.rounds_mode!r}")

    def _check_secure_aggregation(self) -> None:
        """Refuses what needs the individual updates that secure aggregation hides (ARCHITECTURE.md, decision 13)."""
        assert self.secure_aggregation is not None
        if self.aggregation != "mean":
            raise ValueError(f"Secure aggregation shows the ps only the sum of a round's updates, and "
                             f"COMIND_AGGREGATION={self.aggregation} needs each of them: set it to mean, or turn "
                             f"COMIND_SECURE_AGGREGATION off. Received: aggregation={self.aggregation!r}")
        if self.weighting != "uniform":
            raise ValueError(f"Under secure aggregation every update counts once: a weight by examples would be "
                             f"applied by each worker to its own update, so that one worker's claim could scale its "
                             f"influence unseen. Leave COMIND_WEIGHTING unset or set it to uniform. Received: "
                             f"weighting={self.weighting!r}")
        if self.privacy is not None:
            self._check_distributed_noise(self.secure_aggregation)
        if self.update_encoding != encodings.FLOAT32:
            raise ValueError(f"Under secure aggregation updates travel as masked 32-bit fixed point (4 bytes a value); "
                             f"unset COMIND_UPDATE_ENCODING. Received: update_encoding={self.update_encoding!r}")
        if self.rounds_mode != async_rounds.SYNC:
            # Its four stages are barriers among one round's parties; a version's updates have no such round.
            raise ValueError(f"Secure aggregation unmasks the sum of one round's parties together, and asynchronous "
                             f"rounds have no such round: set COMIND_ROUNDS_MODE to sync, or turn "
                             f"COMIND_SECURE_AGGREGATION off. Received: rounds_mode={self.rounds_mode!r}")


    def _check_distributed_noise(self, secure: SecAggSettings) -> None:
        """Refuses worker-level DP under secure aggregation where the workers cannot noise their updates as it says."""
        assert self.privacy is not None
        if self.privacy.adaptive:
            # Its rule needs the count of updates within C, one bit per worker, which the ps does not see either.
            raise ValueError("Adaptive clipping follows the norms of the updates, which secure aggregation hides "
                             "from the ps: set COMIND_DP_CLIP to a number (each worker clips to it before masking), "
                             "or turn COMIND_SECURE_AGGREGATION off. Received: dp_clip='adaptive'")
        noise = secure.noise
        if noise is None or (noise.clip, noise.noise_multiplier, noise.expected_updates) != (
                self.privacy.clip, self.privacy.noise_multiplier, self.privacy.expected_updates):
            raise ValueError(f"Under secure aggregation the workers add the DP noise, so the secure-aggregation "
                             f"settings must carry the DP stage's clip, noise multiplier and expected updates. "
                             f"Received: noise={noise!r}, privacy={self.privacy!r}")
        if secure.clip_range < noise.needed_range:
            raise ValueError(
                f"Under secure aggregation with differential privacy each value a worker masks is its clipped update "
                f"(up to C = {noise.clip:g}) plus its noise share (std z C / sqrt(m) = {noise.share_std:.4g}), and "
                f"COMIND_SECAGG_CLIP_RANGE must hold C plus 10 of those stds: set it to at least "
                f"{math.ceil(noise.needed_range * 100) / 100:g}. Received: secagg_clip_range={secure.clip_range:g}")


class RoundInProgress:
    """One round's updates, transformed and folded into its aggregate as they arrive."""

    def __init__(self, aggregate: RoundAggregate | DpRound, clip: NormClip | None, privacy: DpFedAvg | None = None):
        self._aggregate = aggregate
        self._clip = clip
        self._privacy = privacy

    @property
    def count(self) -> int:
        return self._aggregate.count

    def add(self, update: Sequence[np.ndarray], weight: float, scale: float = 1.0) -> float | None:
        """Transforms ``update`` in place and folds it in; returns its norm before clipping, if clipped.

        Args:
            scale: what the (clipped) change is multiplied by first: asynchronous rounds' staleness weight.
        """
        norm = self._clip(update) if self._clip else None
        if scale != 1.0:
            for tensor in update:
                if tensor.dtype.kind == "f":  # others (counters, seeds) travel as values, not changes
                    tensor *= tensor.dtype.type(scale)
        self._aggregate.add(update, weight)
        return norm

    def result(self, sampled_fraction: float = 1.0) -> np.ndarray:
        """The round's aggregate update; with DP, noised, and the round entered in the ledger.

        Args:
            sampled_fraction: q, the fraction of the population this round sampled (the privacy ledger's).
        """
        if isinstance(self._aggregate, DpRound):
            assert self._privacy is not None
            return self._privacy.release(self._aggregate, sampled_fraction)
        if self._privacy is not None:
            # Distributed noise (secure aggregation): the workers noised their updates; the ledger first, as above.
            self._privacy.record_distributed(self._aggregate.count, sampled_fraction)
        return self._aggregate.result()


class ServerPipeline:
    """The stages the settings name, and their state.

    Args:
        settings: the choice for each stage.
    """

    def __init__(self, settings: PipelineSettings = PipelineSettings()):
        self.settings = settings
        self.weight = WEIGHTINGS[settings.weighting]
        self.aggregator = AGGREGATORS[settings.aggregation](AggregatorSettings(settings.trim_fraction))
        # Under secure aggregation the ps sees no update to clip: the workers clip before masking.
        self.clip = NormClip(settings.max_update_norm) \
            if settings.max_update_norm is not None and settings.secure_aggregation is None else None
        self.optimizer = SERVER_OPTIMIZERS[settings.server_optimizer](settings.server_optimizer_settings)
        #: The decode stage: what every update's bytes are, and what the model's are on their way down.
        self.update_encoding = encodings.parse(settings.update_encoding)
        self.model_encoding = encodings.parse(settings.model_encoding)
        self.privacy = DpFedAvg(settings.privacy) if settings.privacy else None
        #: Asynchronous rounds' ids of the updates taken (:class:`comind.async_rounds.UpdateIds`); None: synchronous.
        self.update_ids = async_rounds.UpdateIds() if settings.rounds_mode == async_rounds.ASYNC else None
        self._optimizer_state: dict[str, np.ndarray] | None = None
        # A privacy ledger in the checkpoint while DP is off: saved again, so that a budget once spent stays spent.
        self._kept_ledger: dict[str, np.ndarray] = {}
        # Named by the optimizer: another optimizer's state in a checkpoint is not taken for this one's.
        self._state_prefix = f"server_optimizer/{settings.server_optimizer}/"

    def check_quorum(self, num_updates: int) -> None:
        self.aggregator.check_quorum(num_updates)

    def start_round(self, layout: Layout, model: np.ndarray) -> RoundInProgress:
        """A round of updates trained from ``model``, the global model, packed in ``layout``."""
        if self.privacy:
            return RoundInProgress(self.privacy.start(layout, model), None, self.privacy)
        return RoundInProgress(self.aggregator.start(layout), self.clip)

    def step(self, layout: Layout, model: np.ndarray,
             aggregate: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The new global model and the optimizer's new state; nothing changes until :meth:`commit`."""
        state = self._optimizer_state if self._optimizer_state is not None else self.optimizer.initial_state(layout)
        return self.optimizer.step(layout, model, aggregate, state)

    def commit(self, optimizer_state: dict[str, np.ndarray]) -> None:
        """Keeps the state of a step whose model was published."""
        self._optimizer_state = optimizer_state

    def state(self) -> dict[str, np.ndarray]:
        """Every stage's state, by checkpoint key."""
        privacy = {DP_PREFIX + k: v for k, v in self.privacy.state().items()} if self.privacy else self._kept_ledger
        update_ids = self.update_ids.state() if self.update_ids else {}
        return {self._state_prefix + k: v for k, v in (self._optimizer_state or {}).items()} | privacy | update_ids

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Takes the state saved in a checkpoint."""
        privacy = {key.removeprefix(DP_PREFIX): v for key, v in saved.items() if key.startswith(DP_PREFIX)}
        if self.privacy:
            self.privacy.restore(privacy)
        elif privacy:
            log.warning("The checkpoint holds a privacy ledger, and differential privacy is now off: the rounds from "
                        "here have no privacy guarantee. The ledger is kept in each checkpoint.")
            self._kept_ledger = {DP_PREFIX + k: v for k, v in privacy.items() if k.startswith("ledger/")}
        if self.update_ids:
            self.update_ids.restore(saved)
        # Ids from asynchronous rounds are of updates applied already: a restart in synchronous rounds needs none.
        saved = {key: v for key, v in saved.items() if not key.startswith((DP_PREFIX, async_rounds.STATE_PREFIX))}
        prefix = self._state_prefix
        unknown = [key for key in saved if not key.startswith(prefix)]
        if unknown:
            log.warning("The checkpoint holds state that these settings do not use (%s); ignoring it.",
                        ", ".join(unknown))
        mine = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
        self._optimizer_state = mine or None
