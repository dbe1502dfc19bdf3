"""The ps's side of a round, as a pipeline of named stages.

After an update is decoded (``encodings.py``: the encoding the ps
announced) and validated (``service.py``, ``ps.py``) it passes, in order:

1. **weighting** (``weighting.py``): what it counts for in the mean;
2. **per-update transforms** (``clipping.py``): the norm bound;
3. the **aggregator** (``aggregators.py``): mean, median or trimmed mean,
   into one aggregate update for the round;
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
from collections.abc import Mapping, Sequence

import numpy as np

from comind import encodings, modes
from comind.aggregators import AGGREGATORS, AggregatorSettings, RoundAggregate
from comind.clipping import NormClip
from comind.server_optimizers import SERVER_OPTIMIZERS, ServerOptimizerSettings
from comind.tensors import Layout
from comind.weighting import WEIGHTINGS

log = logging.getLogger(__name__)

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

    def __post_init__(self) -> None:
        WEIGHTINGS[self.weighting], AGGREGATORS[self.aggregation], SERVER_OPTIMIZERS[self.server_optimizer]
        encodings.parse(self.update_encoding)
        if self.model_encoding not in encodings.MODEL_ENCODINGS:
            raise ValueError(f"model_encoding must be one of {', '.join(encodings.MODEL_ENCODINGS)}. Received: "
                             f"model_encoding={self.model_encoding!r}")
        if self.mode not in modes.MODES:
            raise ValueError(f"mode must be one of {', '.join(modes.MODES)}. Received: mode={self.mode!r}")


class RoundInProgress:
    """One round's updates, transformed and folded into its aggregate as they arrive."""

    def __init__(self, aggregate: RoundAggregate, clip: NormClip | None):
        self._aggregate = aggregate
        self._clip = clip

    @property
    def count(self) -> int:
        return self._aggregate.count

    def add(self, update: Sequence[np.ndarray], weight: float) -> float | None:
        """Transforms ``update`` in place and folds it in; returns its norm before clipping, if clipped."""
        norm = self._clip(update) if self._clip else None
        self._aggregate.add(update, weight)
        return norm

    def result(self) -> np.ndarray:
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
        self.clip = NormClip(settings.max_update_norm) if settings.max_update_norm is not None else None
        self.optimizer = SERVER_OPTIMIZERS[settings.server_optimizer](settings.server_optimizer_settings)
        #: The decode stage: what every update's bytes are, and what the model's are on their way down.
        self.update_encoding = encodings.parse(settings.update_encoding)
        self.model_encoding = encodings.parse(settings.model_encoding)
        self._optimizer_state: dict[str, np.ndarray] | None = None
        # Named by the optimizer: another optimizer's state in a checkpoint is not taken for this one's.
        self._state_prefix = f"server_optimizer/{settings.server_optimizer}/"

    def check_quorum(self, num_updates: int) -> None:
        self.aggregator.check_quorum(num_updates)

    def start_round(self, layout: Layout) -> RoundInProgress:
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
        return {self._state_prefix + k: v for k, v in (self._optimizer_state or {}).items()}

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Takes the state saved in a checkpoint."""
        prefix = self._state_prefix
        unknown = [key for key in saved if not key.startswith(prefix)]
        if unknown:
            log.warning("The checkpoint holds state that these settings do not use (%s); ignoring it.",
                        ", ".join(unknown))
        mine = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
        self._optimizer_state = mine or None
