"""Federated averaging for Keras: a ``model.fit`` callback and a custom-loop wrapper.

Both count local steps and, every ``interval_steps``, push the model's
weights to the ps and continue from the new global model (McMahan et al.
2017). With ``interval_steps=1`` this is synchronous data-parallel training.

Optimizer state (Adam's moments, the step count) stays local and is kept
across syncs, as with the original ``FederatedAveragingOptimizer``, whose
optimizer slots were never averaged: only the model's weights are. Resetting
it at every sync would throw away each worker's curvature estimates and
restart Adam's bias correction, which slows training for no gain in
agreement between workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import keras

from comind.client import GlobalState, WorkerClient
from comind.metrics import WorkerMetrics

log = logging.getLogger(__name__)

OnRound = Callable[[GlobalState], None]


class _ModelSync:
    """The bookkeeping the callback and the wrapper share."""

    def __init__(self, client: WorkerClient, interval_steps: int, on_round: OnRound | None,
                 metrics: WorkerMetrics | None, num_examples: int | None):
        if interval_steps < 1:
            raise ValueError(f"interval_steps must be at least 1. Received: interval_steps={interval_steps}")
        if num_examples is not None and num_examples < 1:
            raise ValueError(f"num_examples is this worker's number of training examples, at least 1 (or None to "
                             f"count the examples each interval processed). Received: num_examples={num_examples}")
        self.client = client
        self.num_examples = num_examples
        self.interval_steps = interval_steps
        self.on_round = on_round
        self.metrics = metrics
        self.model: keras.Model | None = None
        self.state: GlobalState | None = None
        self.syncs = 0
        self.examples_trained = 0
        self._steps = self._examples = 0
        self._loss = self._accuracy = 0.0
        self._resumed = time.perf_counter()  # when local training last continued from a global model

    @property
    def done(self) -> bool:
        return self.state is not None and self.state.done

    def start(self, model: keras.Model) -> None:
        """Joins, and starts from the global model (the chief's weights, or a checkpoint)."""
        self.model = model
        if self.state is None:
            self._adopt(self.client.join(model.get_weights(), [w.path for w in model.weights]))

    def step(self, num_examples: int, loss: float | None, accuracy: float | None) -> None:
        """Counts one local step; syncs when the interval is full."""
        self._steps += 1
        self._examples += num_examples
        self.examples_trained += num_examples
        self._loss = self._loss if loss is None else float(loss)
        self._accuracy = self._accuracy if accuracy is None else float(accuracy)
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.examples.inc(num_examples)
            self.metrics.loss.set(self._loss)
        if self._steps >= self.interval_steps:
            self.sync()

    def _started(self) -> keras.Model:
        if self.model is None:
            raise RuntimeError("Training steps came before the start: the model joins the ps in start(), which "
                               "must come first (FederatedAveragingOptimizer.start(), or model.fit with the "
                               "FederatedAveraging callback). Received: model=None")
        return self.model

    def sync(self) -> None:
        if self._steps == 0 or self.done:
            return
        pushed = time.perf_counter()
        # McMahan et al. weight a worker by its training examples; without their number, by those it processed.
        weight = self.num_examples if self.num_examples is not None else max(1, self._examples)
        state = self.client.sync(self._started().get_weights(), num_examples=weight,
                                 loss=self._loss, accuracy=self._accuracy)
        # Local training against time spent between rounds: what a round costs beyond its steps.
        log.debug("Round %d: %d local steps in %.4f s; the sync took %.4f s.", state.round, self._steps,
                  pushed - self._resumed, time.perf_counter() - pushed)
        self._steps = self._examples = 0
        self.syncs += 1
        self._adopt(state)

    def _adopt(self, state: GlobalState) -> None:
        self._started().set_weights(state.weights)
        self.state = state
        if self.on_round:
            self.on_round(state)
        self._resumed = time.perf_counter()


class FederatedAveraging(keras.callbacks.Callback):
    """Trains a ``model.fit`` federated: every ``interval_steps`` batches, averages weights via the ps.

    It joins at the start of training (every worker starts from the chief's
    initial weights, or the ps's checkpoint), syncs every ``interval_steps``
    batches and once more at the end, and stops training when the ps says
    training is done.

    Args:
        client: a :class:`comind.WorkerClient` connected to the ps.
        interval_steps: local batches between syncs.
        batch_size: examples per batch, for counting the examples trained.
        on_round: called with each new global model (the chief evaluates it).
        metrics: worker metrics to update.
        num_examples: this worker's number of training examples, which its
            updates weigh in the ps's example-weighted mean (McMahan et al.
            2017); None weighs each update by the examples its interval
            processed (batches x ``batch_size``) instead.

    Example:
        >>> client = comind.WorkerClient("ps:2222", task_index=0)
        >>> model.fit(x, y, batch_size=32, epochs=5,
        ...           callbacks=[comind.FederatedAveraging(client, interval_steps=100, batch_size=32,
        ...                                                num_examples=len(x))])
    """

    def __init__(self, client: WorkerClient, interval_steps: int = 100, batch_size: int | None = None,
                 on_round: OnRound | None = None, metrics: WorkerMetrics | None = None,
                 num_examples: int | None = None):
        super().__init__()
        self._sync = _ModelSync(client, interval_steps, on_round, metrics, num_examples)
        self._batch_size = batch_size or 1

    @property
    def syncs(self) -> int:
        return self._sync.syncs

    @property
    def examples_trained(self) -> int:
        return self._sync.examples_trained

    @property
    def state(self) -> GlobalState | None:
        return self._sync.state

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._sync.start(self.model)
        if self._sync.done:
            self.model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self._sync.step(self._batch_size, logs.get("loss"), logs.get("accuracy"))
        if self._sync.done:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._sync.sync()


class FederatedAveragingOptimizer:
    """A Keras optimizer that averages the model with the other workers every ``interval_steps``.

    The successor of the original ``FederatedAveragingOptimizer`` for custom
    training loops: apply gradients through it as through the optimizer it
    wraps. ``replicas_to_aggregate`` and ``is_chief`` keep their meaning: the
    number of updates that close a round (set on the ps; given here, it is
    checked against the ps's), and whether this worker provides the initial
    weights. ``num_examples`` is this worker's number of training examples,
    its updates' weight (None: the examples ``apply`` counted in the interval).

    Example:
        >>> opt = comind.FederatedAveragingOptimizer(keras.optimizers.Adam(1e-3), model, client,
        ...                                          interval_steps=10, num_examples=len(x_train))
        >>> opt.start()
        >>> for x, y in batches:
        ...     loss, grads = compute(model, x, y)
        ...     opt.apply(grads, num_examples=len(x), loss=loss)
        ...     if opt.done:
        ...         break
        >>> opt.finish()
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, model: keras.Model, client: WorkerClient, *,
                 interval_steps: int = 100, replicas_to_aggregate: int | None = None,
                 is_chief: bool | None = None, on_round: OnRound | None = None,
                 metrics: WorkerMetrics | None = None, num_examples: int | None = None):
        if is_chief is not None:
            client.is_chief = is_chief
        self.optimizer = optimizer
        self.model = model
        self.replicas_to_aggregate = replicas_to_aggregate
        self._sync = _ModelSync(client, interval_steps, on_round, metrics, num_examples)

    @property
    def done(self) -> bool:
        return self._sync.done

    @property
    def state(self) -> GlobalState | None:
        return self._sync.state

    def start(self) -> None:
        self._sync.start(self.model)
        expected, actual = self.replicas_to_aggregate, self._sync.client.replicas_to_aggregate
        if expected is not None and expected != actual:
            raise ValueError(
                f"This worker expects rounds of {expected} updates, but the ps closes them with "
                f"{actual or 'every live worker'}; set COMIND_REPLICAS_TO_AGGREGATE on the ps to match. "
                f"Received: replicas_to_aggregate={expected}")

    def apply(self, gradients: Iterable[Any], num_examples: int = 1, loss: float | None = None,
              accuracy: float | None = None) -> None:
        """Applies gradients to the model's trainable variables; syncs every ``interval_steps`` calls.

        ``loss`` and ``accuracy`` are the step's training figures; the last
        of an interval's go with its update, and the ps's round line and
        ``comind_train_*`` series show their example-weighted mean (0 for a
        figure never given).
        """
        self.optimizer.apply(gradients, self.model.trainable_variables)
        self._sync.step(num_examples, loss, accuracy)

    def finish(self) -> None:
        """Syncs the last partial interval, if any."""
        self._sync.sync()
