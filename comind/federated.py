"""Federated averaging for Keras: a ``model.fit`` callback and a custom-loop wrapper.

Both count local steps and, every ``interval_steps``, push the model's
weights to the ps and continue from the new global model (McMahan et al.
2017). A ps in distributed mode (:mod:`comind.modes`) makes every step a
round instead: the gradients go to the ps, whose optimizer takes the step.

Optimizer state (Adam's moments, the step count) stays local and is kept
across syncs, as with the original ``FederatedAveragingOptimizer``, whose
optimizer slots were never averaged: only the model's weights are. Resetting
it at every sync would throw away each worker's curvature estimates and
restart Adam's bias correction, which slows training for no gain in
agreement between workers.

With ``proximal_mu`` > 0 each local step minimises FedProx's objective
``L(w) + mu/2 ||w - x||^2``, ``x`` the global model the worker last received
(Li et al. 2020): its gradient gains ``mu (w - x)``, which keeps workers with
skewed data near the global model. ``model.fit`` gets the term as a weight
regularizer on each trainable variable (so it is part of the loss Keras
differentiates, and of the loss ``fit`` reports), the custom-loop wrapper by
adding ``mu (w - x)`` to the gradients it is given. ``proximal_mu=0`` changes
nothing: it is FedAvg. The anchor ``x`` lives in TensorFlow variables that
the traced training step reads, which needs the TensorFlow backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np

from comind import evaluation, federated_eval, modes
from comind.client import GlobalState, WorkerClient
from comind.dpsgd import ExampleAccountant, ExampleLevelPrivacy, check
from comind.metrics import WorkerMetrics
from comind.sync_replicas import SyncReplicasOptimizer, gradients_by_variable, step_change

log = logging.getLogger(__name__)

OnRound = Callable[[GlobalState], None]
#: A worker's held-out examples, inputs and labels, for federated evaluation.
EvalData = tuple[np.ndarray, np.ndarray]
#: A loss function ``loss(y_true, y_pred)``, as Keras's losses are.
Loss = Callable[[Any, Any], Any]


class _Proximal:
    """FedProx's term ``mu/2 ||w - x||^2`` for a model's trainable variables, ``x`` the global model it last got.

    References:
        Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization in Heterogeneous Networks",
        MLSys (equation 2).
    """

    def __init__(self, mu: float):
        if not mu >= 0:
            raise ValueError(f"proximal_mu is FedProx's mu, a number >= 0 (0 is FedAvg). Received: proximal_mu={mu}")
        self.mu = mu
        self._anchors: list[keras.Variable] = []
        self._replaced: list[tuple[keras.Variable, Any]] = []

    def anchor(self, model: keras.Model) -> None:
        """Makes the model's current trainable weights the point the term pulls towards."""
        variables = model.trainable_variables
        if not self._anchors:
            self._anchors = [keras.Variable(keras.ops.convert_to_tensor(v), dtype=v.dtype, trainable=False,
                                            name=f"proximal_anchor_{i}") for i, v in enumerate(variables)]
            return
        for anchor, variable in zip(self._anchors, variables, strict=True):
            anchor.assign(keras.ops.convert_to_tensor(variable))

    def gradients(self, gradients: Iterable[Any], variables: Iterable[keras.Variable]) -> list[Any]:
        """``g + mu (w - x)`` for each gradient ``g`` of a variable ``w``; None stays None (``w`` does not move)."""
        return [g if g is None else g + self.mu * (w - x)
                for g, w, x in zip(gradients, variables, self._anchors, strict=True)]

    def install(self, model: keras.Model) -> None:
        """Adds the term to the model's loss, as a regularizer of each trainable variable (after its own)."""
        for variable, anchor in zip(model.trainable_variables, self._anchors, strict=True):
            self._replaced.append((variable, variable.regularizer))
            variable.regularizer = _ProximalTerm(anchor, self.mu, variable.regularizer)

    def uninstall(self) -> None:
        for variable, regularizer in self._replaced:
            variable.regularizer = regularizer
        self._replaced.clear()


class _ProximalTerm:
    """``mu/2 ||w - x||^2``, plus the variable's own regularizer, if it had one."""

    def __init__(self, anchor: keras.Variable, mu: float, own: Callable[[Any], Any] | None):
        self.anchor, self.mu, self.own = anchor, mu, own

    def __call__(self, value: Any) -> Any:
        term = (self.mu / 2) * keras.ops.sum(keras.ops.square(value - self.anchor))
        return term if self.own is None else term + self.own(value)


class _ModelSync:
    """The bookkeeping the callback and the wrapper share."""

    def __init__(self, client: WorkerClient, interval_steps: int, on_round: OnRound | None,
                 metrics: WorkerMetrics | None, num_examples: int | None, proximal_mu: float = 0.0,
                 eval_data: EvalData | None = None, eval_loss: Loss | None = None):
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
        self.proximal = _Proximal(proximal_mu) if proximal_mu else None
        if eval_data is not None and not (len(eval_data) == 2 and 0 < len(eval_data[0]) == len(eval_data[1])):
            raise ValueError(f"eval_data is this worker's held-out examples, a pair (x, y) of as many inputs as "
                             f"labels, at least one. Received: eval_data of {len(eval_data)} parts")
        self.eval_data = eval_data
        self.eval_loss = eval_loss
        #: This worker's test of the global model it trains from, to go up with its next update.
        self.evaluation: federated_eval.Report | None = None
        #: Example-level DP-SGD's ledger of this worker's steps, if it trains with DP-SGD: its epsilon is logged and
        #: shown at every sync.
        self.accountant: ExampleAccountant | None = None
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

    def example_level(self, clip: float | None, noise_multiplier: float | None, batch_size: int | None,
                      delta: float) -> ExampleLevelPrivacy | None:
        """Example-level DP-SGD's step for these settings, with this worker's ledger; None without DP-SGD."""
        if not check(clip, noise_multiplier):
            return None
        assert clip is not None and noise_multiplier is not None
        if batch_size is None or self.num_examples is None:
            raise ValueError(f"Example-level DP-SGD's accounting needs the fraction of this worker's examples each "
                             f"step samples: give batch_size and num_examples. Received: batch_size={batch_size!r}, "
                             f"num_examples={self.num_examples!r}")
        self.accountant = ExampleAccountant(noise_multiplier, batch_size, self.num_examples, delta)
        return ExampleLevelPrivacy(clip, noise_multiplier)

    @property
    def example_epsilon(self) -> float | None:
        return self.accountant.epsilon if self.accountant else None

    def start(self, model: keras.Model) -> None:
        """Joins, and starts from the global model (the chief's weights, or a checkpoint)."""
        self.model = model
        if self.state is None:
            state = self.client.join(model.get_weights(), [w.path for w in model.weights])
            if self.client.federated_eval_every and self.eval_data is None:
                raise ValueError(f"The ps asks every worker to test the global model every "
                                 f"{self.client.federated_eval_every} rounds (COMIND_FEDERATED_EVAL_EVERY) on "
                                 f"examples it holds out: give this worker's as eval_data=(x, y) (comind worker "
                                 f"holds out --eval-fraction of its shard), or unset it on the ps. Received: "
                                 f"eval_data=None")
            self._adopt(state)
        if self.distributed and self.proximal:
            raise ValueError(f"The ps trains in distributed mode, where the ps's optimizer takes every step: FedProx's "
                             f"term has no local training to pull towards the global model. Leave proximal_mu at 0, "
                             f"or train federated. Received: proximal_mu={self.proximal.mu}")

    @property
    def distributed(self) -> bool:
        """Whether updates are gradients, one step each (the ps's mode, :mod:`comind.modes`)."""
        return self.client.mode == modes.DISTRIBUTED

    def step(self, num_examples: int, loss: float | None, accuracy: float | None,
             gradients: dict[int, np.ndarray] | None = None) -> None:
        """Counts one local step; syncs when the interval is full, or at once with the step's ``gradients``."""
        self._steps += 1
        self._examples += num_examples
        self.examples_trained += num_examples
        self._loss = self._loss if loss is None else float(loss)
        self._accuracy = self._accuracy if accuracy is None else float(accuracy)
        if self.accountant:
            self.accountant.step()
        if self.metrics:
            self.metrics.steps.inc()
            self.metrics.examples.inc(num_examples)
            self.metrics.loss.set(self._loss)
        if gradients is not None:
            self.sync(gradients)
        elif self._steps >= self.interval_steps:
            self.sync()

    def _started(self) -> keras.Model:
        if self.model is None:
            raise RuntimeError("Training steps came before the start: the model joins the ps in start(), which "
                               "must come first (FederatedAveragingOptimizer.start(), or model.fit with the "
                               "FederatedAveraging callback). Received: model=None")
        return self.model

    def sync(self, gradients: dict[int, np.ndarray] | None = None) -> None:
        """Sends the update of the steps since the last sync: the weights' change, or minus the step's gradients."""
        if self._steps == 0 or self.done:
            return
        pushed = time.perf_counter()
        model = self._started()
        if gradients is not None:
            # A distributed step weighs its batch: the round's mean is then the gradient of the combined batch.
            weight = self._examples
            assert self.state is not None  # start() joined
            change = step_change(model, gradients, self.state.weights)
        else:
            # McMahan et al. weight a worker by its training examples; without their number, by those it processed.
            weight = self.num_examples if self.num_examples is not None else max(1, self._examples)
            change = None
        state = self.client.sync(model.get_weights(), num_examples=weight, loss=self._loss, accuracy=self._accuracy,
                                 change=change, evaluation=self.evaluation)
        self.evaluation = None
        # Local training against time spent between rounds: what a round costs beyond its steps.
        log.debug("Round %d: %d local steps in %.4f s; the sync took %.4f s.", state.round, self._steps,
                  pushed - self._resumed, time.perf_counter() - pushed)
        self._steps = self._examples = 0
        self.syncs += 1
        if self.accountant:
            epsilon = self.accountant.epsilon
            log.info("Round %d: this worker's %s.", state.round, self.accountant.describe())
            if self.metrics:
                self.metrics.dp_epsilon.set(epsilon)
        self._adopt(state)

    def _adopt(self, state: GlobalState) -> None:
        self._started().set_weights(state.weights)
        if self.eval_data is not None and not state.done and \
                federated_eval.due(state.round, self.client.federated_eval_every):
            # Before training from it, in line: a held-out share of one shard takes milliseconds.
            x, y = self.eval_data
            loss, accuracy = evaluation.evaluate(self._started(), x, y, loss=self.eval_loss)
            self.evaluation = federated_eval.Report(state.round, loss, accuracy, len(y))
            log.info("Round %d federated evaluation: this worker's %d held-out examples, loss %.4f, accuracy %.4f.",
                     state.round, len(y), loss, accuracy)
        if self.proximal:
            self.proximal.anchor(self._started())
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
        proximal_mu: FedProx's ``mu`` (Li et al. 2020): training minimises
            ``L(w) + mu/2 ||w - x||^2``, ``x`` the last global model, through a
            regularizer on each trainable variable while ``fit`` runs (the loss
            ``fit`` reports includes it). 0 (the default) is FedAvg.
        dp_example_clip: example-level DP-SGD's C (Abadi et al. 2016; see
            :mod:`comind.dpsgd`): while ``fit`` runs, each step clips every
            example's gradient to L2 norm C, adds Gaussian noise of std
            ``dp_example_noise_multiplier * C`` to their sum and divides by the
            batch size. Needs ``batch_size`` and ``num_examples`` (the sampled
            fraction q is their ratio) and ``dp_example_noise_multiplier``.
        dp_example_noise_multiplier: z of example-level DP-SGD.
        dp_delta: the delta this worker's example-level epsilon is given at,
            logged at every sync (``example_epsilon``).
        eval_data: this worker's held-out examples ``(x, y)``, which it never
            trains on: when the ps asks for federated evaluation
            (``--federated-eval-every``), the worker tests the global model on
            them with the compiled loss, and reports with its next update.

    Example:
        >>> client = comind.WorkerClient("ps:2222", task_index=0)
        >>> model.fit(x, y, batch_size=32, epochs=5,
        ...           callbacks=[comind.FederatedAveraging(client, interval_steps=100, batch_size=32,
        ...                                                num_examples=len(x))])
    """

    def __init__(self, client: WorkerClient, interval_steps: int = 100, batch_size: int | None = None,
                 on_round: OnRound | None = None, metrics: WorkerMetrics | None = None,
                 num_examples: int | None = None, proximal_mu: float = 0.0, dp_example_clip: float | None = None,
                 dp_example_noise_multiplier: float | None = None, dp_delta: float = 1e-5,
                 eval_data: EvalData | None = None):
        super().__init__()
        self._sync = _ModelSync(client, interval_steps, on_round, metrics, num_examples, proximal_mu, eval_data)
        self._batch_size = batch_size or 1
        self._privacy = self._sync.example_level(dp_example_clip, dp_example_noise_multiplier, batch_size, dp_delta)

    @property
    def example_epsilon(self) -> float | None:
        """Example-level DP-SGD's epsilon spent by this worker's steps so far; None without it."""
        return self._sync.example_epsilon

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
        _check_optimizer(self.model.optimizer, self._sync.distributed)
        if self._sync.done:
            self.model.stop_training = True
        if self._sync.proximal:
            self._sync.proximal.install(self.model)
        if self._privacy:
            self._privacy.install(self.model)
        if self._sync.proximal or self._privacy:
            # fit made its training step before calling us: make it again, with the term in its loss or DP-SGD's step.
            self.model.make_train_function(force=True)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        # on_train_begin made sure that the model's optimizer keeps its gradients in distributed mode.
        gradients = self.model.optimizer.gradients() if self._sync.distributed else None
        self._sync.step(self._batch_size, logs.get("loss"), logs.get("accuracy"), gradients)
        if self._sync.done:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._sync.sync()
        if self._sync.proximal:
            self._sync.proximal.uninstall()
            self.model.train_function = None  # the next fit makes one without the term
        if self._privacy:
            self._privacy.uninstall(self.model)


def _check_optimizer(optimizer: keras.optimizers.Optimizer, distributed: bool) -> None:
    """Refuses a model whose optimizer does not train in the ps's mode."""
    if distributed and not isinstance(optimizer, SyncReplicasOptimizer):
        raise ValueError(
            "The ps trains in distributed mode: each step's gradients go to the ps, and its optimizer takes the "
            "step. Compile the model with optimizer=comind.SyncReplicasOptimizer() (comind worker does so with "
            "--mode distributed), or start the ps in federated mode. "
            f"Received: optimizer={type(optimizer).__name__}")
    if not distributed and isinstance(optimizer, SyncReplicasOptimizer):
        raise ValueError(
            "The model is compiled with comind.SyncReplicasOptimizer, which leaves every step to a ps in distributed "
            "mode, but the ps trains federated. Start every process with --mode distributed (COMIND_MODE), or "
            "compile the model with an optimizer that trains. Received: optimizer=SyncReplicasOptimizer")


class FederatedAveragingOptimizer:
    """A Keras optimizer that averages the model with the other workers every ``interval_steps``.

    The successor of the original ``FederatedAveragingOptimizer`` for custom
    training loops: apply gradients through it as through the optimizer it
    wraps. ``replicas_to_aggregate`` and ``is_chief`` keep their meaning: the
    number of updates that close a round (set on the ps; given here, it is
    checked against the ps's), and whether this worker provides the initial
    weights. ``num_examples`` is this worker's number of training examples,
    its updates' weight (None: the examples ``apply`` counted in the interval).
    With ``proximal_mu`` > 0 (FedProx, Li et al. 2020), ``apply`` adds
    ``proximal_mu * (w - x)`` to the gradient of each variable ``w``, ``x``
    the global model it last received; the gradients given are those of the
    loss alone. ``eval_data`` and ``eval_loss`` serve federated evaluation,
    when the ps asks for it: the worker's held-out examples ``(x, y)``, and
    the loss to report on them (None: the model's compiled loss).

    With ``dp_example_clip`` and ``dp_example_noise_multiplier`` (example-level
    DP-SGD, Abadi et al. 2016; see :mod:`comind.dpsgd`), gradients computed
    outside cannot be clipped per example, so :meth:`apply` is refused and
    :meth:`train_step` takes the batch instead: each example's gradient
    clipped to L2 norm C, their sum noised with std ``z C``, over the batch
    size. The model must be compiled with its loss (``model.compile(loss=...)``;
    its own optimizer is not used). The worker's ledger counts the steps
    (``batch_size / num_examples`` sampled each), and its epsilon at
    ``dp_delta`` is logged at every sync, set in ``comind_worker_dp_epsilon``
    and given by :attr:`example_epsilon`.

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

        With DP-SGD, each step is ``opt.train_step(x, y)`` instead of computing
        gradients and applying them:

        >>> opt = comind.FederatedAveragingOptimizer(keras.optimizers.SGD(0.1), model, client, interval_steps=10,
        ...                                          num_examples=len(x_train), batch_size=32,
        ...                                          dp_example_clip=1.0, dp_example_noise_multiplier=1.1)
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, model: keras.Model, client: WorkerClient, *,
                 interval_steps: int = 100, replicas_to_aggregate: int | None = None,
                 is_chief: bool | None = None, on_round: OnRound | None = None,
                 metrics: WorkerMetrics | None = None, num_examples: int | None = None,
                 proximal_mu: float = 0.0, eval_data: EvalData | None = None, eval_loss: Loss | None = None,
                 batch_size: int | None = None, dp_example_clip: float | None = None,
                 dp_example_noise_multiplier: float | None = None, dp_delta: float = 1e-5):
        if is_chief is not None:
            client.is_chief = is_chief
        self.optimizer = optimizer
        self.model = model
        self.replicas_to_aggregate = replicas_to_aggregate
        self._sync = _ModelSync(client, interval_steps, on_round, metrics, num_examples, proximal_mu, eval_data,
                                eval_loss)
        self._privacy = self._sync.example_level(dp_example_clip, dp_example_noise_multiplier, batch_size, dp_delta)
        if self._privacy and not model.compiled:
            raise ValueError("Example-level DP-SGD computes each example's gradient of the model's loss: compile the "
                             "model with it first (model.compile(loss=...); the wrapper's optimizer trains). "
                             "Received: model.compiled=False")
        self._private_gradients = self._privacy.traced_gradients(model) if self._privacy else None

    @property
    def done(self) -> bool:
        return self._sync.done

    @property
    def example_epsilon(self) -> float | None:
        """Example-level DP-SGD's epsilon spent by this worker's steps so far; None without it."""
        return self._sync.example_epsilon

    @property
    def state(self) -> GlobalState | None:
        return self._sync.state

    def start(self) -> None:
        self._sync.start(self.model)
        if self._sync.distributed:
            log.info("Distributed mode: the ps's optimizer applies the gradients; %s is not used.",
                     type(self.optimizer).__name__)
        expected, actual = self.replicas_to_aggregate, self._sync.client.replicas_to_aggregate
        if expected is not None and expected != actual:
            raise ValueError(
                f"This worker expects rounds of {expected} updates, but the ps closes them with "
                f"{actual or 'every live worker'}; set COMIND_REPLICAS_TO_AGGREGATE on the ps to match. "
                f"Received: replicas_to_aggregate={expected}")

    def apply(self, gradients: Iterable[Any], num_examples: int = 1, loss: float | None = None,
              accuracy: float | None = None) -> None:
        """Applies gradients to the model's trainable variables; syncs every ``interval_steps`` calls.

        In distributed mode the gradients go to the ps at once, and the
        model continues from the step the ps's optimizer takes with the
        round's gradients, weighted by ``num_examples``, the batch's size.

        ``loss`` and ``accuracy`` are the step's training figures; the last
        of an interval's go with its update, and the ps's round line and
        ``comind_train_*`` series show their example-weighted mean (0 for a
        figure never given).
        """
        if self._privacy:
            raise ValueError("This wrapper trains with example-level DP-SGD, whose gradients are each example's, "
                             "clipped and noised: gradients computed outside cannot be. Call train_step(x, y) "
                             "instead of apply(gradients).")
        self._apply(gradients, num_examples, loss, accuracy)

    def train_step(self, x: Any, y: Any, sample_weight: Any = None) -> float:
        """One DP-SGD step on a batch: applies its privatised gradients, counts it, syncs every ``interval_steps``.

        Returns the batch's mean loss (the model's compiled loss, before the step).
        """
        if not self._private_gradients:
            raise ValueError("train_step is example-level DP-SGD's step: give dp_example_clip and "
                             "dp_example_noise_multiplier, or compute the gradients and call apply(gradients).")
        gradients, losses, _ = self._private_gradients(x, y, sample_weight)
        loss = float(keras.ops.mean(losses))
        self._apply(gradients, int(keras.ops.shape(losses)[0]), loss, None)
        return loss

    def _apply(self, gradients: Iterable[Any], num_examples: int, loss: float | None,
               accuracy: float | None) -> None:
        variables = self.model.trainable_variables
        if self._sync.distributed:
            self._sync.step(num_examples, loss, accuracy, gradients_by_variable(gradients, variables))
            return
        if self._sync.proximal:
            gradients = self._sync.proximal.gradients(gradients, variables)
        self.optimizer.apply(gradients, variables)
        self._sync.step(num_examples, loss, accuracy)

    def finish(self) -> None:
        """Syncs the last partial interval, if any."""
        self._sync.sync()
