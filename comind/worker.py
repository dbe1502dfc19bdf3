"""Running a worker, and training on one machine, from settings.

A worker loads its shard of the data, builds the model, and trains it with
:class:`comind.FederatedAveraging` until the ps says training is done. The
chief (task 0) also evaluates the global model on the test set, reports the
figures to the ps, and at the end writes the final model and pictures.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf
from prometheus_client import REGISTRY

from comind import datasets, dpsgd, metrics, models, modes, presets, report, sharding, tensorboard
from comind.auth import TlsFiles, load_token
from comind.client import GlobalState, WorkerClient
from comind.errors import PsRefusal
from comind.evaluation import evaluate as evaluate_model
from comind.federated import FederatedAveraging
from comind.settings import SERVE, TrainSettings, WorkerSettings
from comind.sync_replicas import SyncReplicasOptimizer

log = logging.getLogger(__name__)

#: Evaluations the chief makes over a run when COMIND_EVAL_EVERY is unset.
EVALUATIONS = 100


def prepare(x: np.ndarray) -> np.ndarray:
    """Model inputs as float32; 8-bit images scaled to [0, 1]."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def shard_count(task_index: int, num_workers: int) -> int:
    """Shards to split the data into: ``num_workers``, or more for a worker added by scaling up.

    Membership is dynamic (``kubectl scale`` adds workers without telling the
    others), so a task index past COMIND_NUM_WORKERS is not an error: that
    worker shards as if there were just enough workers to include it, and its
    data overlaps another's rather than nobody training at all.
    """
    if task_index < num_workers:
        return num_workers
    log.warning("Task index %d is not below COMIND_NUM_WORKERS=%d (was the cluster scaled up?); sharding the "
                "data as if there were %d workers.", task_index, num_workers, task_index + 1)
    return task_index + 1


def _model(settings: WorkerSettings | TrainSettings, dataset: datasets.Dataset,
           optimizer: keras.optimizers.Optimizer | None = None) -> keras.Model:
    keras.utils.set_random_seed(settings.seed)
    return models.build(settings.model, dataset.input_shape, dataset.num_classes, settings.learning_rate, optimizer)


def full_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    """The examples in full batches, shuffled anew each epoch, as the original's ``next_batch`` gave them.

    In distributed mode an update weighs its batch's size, and the callback
    counts ``batch_size`` examples a step: a smaller last batch would be
    weighed as a full one.
    """
    if len(x) < batch_size:
        raise ValueError(f"Distributed mode trains on full batches, and this worker's shard holds {len(x)} examples, "
                         f"fewer than one batch: lower COMIND_BATCH_SIZE or use fewer workers. "
                         f"Received: batch_size={batch_size}")
    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size, drop_remainder=True))


def run_worker(settings: WorkerSettings) -> int:
    """Trains until the ps says training is done; returns 0, or with ``after_training`` serve stays up until
    stopped, so that the pod a StatefulSet keeps is not restarted over and over."""
    status = _train(settings)
    if settings.after_training == SERVE:
        log.info("Training is done; this worker stays up until stopped (COMIND_AFTER_TRAINING=serve).")
        while True:
            signal.pause()  # until SIGTERM, which _stop turns into an exit
    return status


def _train(settings: WorkerSettings) -> int:
    task = settings.task_index
    dataset = datasets.load(settings.dataset, settings.data_dir)
    indices = sharding.shard(dataset.y_train, shard_count(task, settings.num_workers), task, settings.shard,
                             settings.dirichlet_alpha, settings.seed)
    distributed = settings.mode == modes.DISTRIBUTED
    model = _model(settings, dataset, SyncReplicasOptimizer() if distributed else None)
    worker_metrics = metrics.WorkerMetrics(REGISTRY)
    metrics.serve(settings.metrics_port, REGISTRY, settings.metrics_host)
    client = WorkerClient(
        settings.ps_address, task_index=task, token=load_token(settings.token, settings.token_file),
        tls=TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca),
        description=socket.gethostname(), unreachable_timeout=settings.unreachable_timeout,
        metrics=worker_metrics)
    client.connect()  # whether the ps asks for federated evaluation decides what this worker trains on
    eval_data = None
    if client.federated_eval_every:
        indices, held_out = sharding.hold_out(indices, settings.eval_fraction, settings.seed, task)
        eval_data = prepare(dataset.x_train[held_out]), dataset.y_train[held_out]
        log.info("Worker %d holds out %d examples of its shard (--eval-fraction %g) to test the global model every "
                 "%d rounds.", task, len(held_out), settings.eval_fraction, client.federated_eval_every)
    x, y = prepare(dataset.x_train[indices]), dataset.y_train[indices]
    log.info("Worker %d: %d training examples of %s (%s shard), model %s.", task, len(x), dataset.name,
             settings.shard, settings.model)
    if settings.proximal_mu:
        log.info("FedProx: each local step also minimises %g/2 ||w - x||^2, x the last global model.",
                 settings.proximal_mu)
    _log_example_privacy(f"Worker {task}", settings, len(x))
    chief = _Chief(settings, dataset, model, client) if client.is_chief else None
    callback = FederatedAveraging(client, settings.interval_steps, settings.batch_size,
                                  on_round=chief.on_round if chief else None, metrics=worker_metrics,
                                  num_examples=len(x), proximal_mu=settings.proximal_mu,
                                  dp_example_clip=settings.dp_example_clip,
                                  dp_example_noise_multiplier=settings.dp_example_noise_multiplier,
                                  dp_delta=settings.dp_delta, eval_data=eval_data)
    if chief:
        chief.example_epsilon = lambda: callback.example_epsilon
    local_figures = tensorboard.Scalars(tensorboard.directory(settings.output_dir, f"worker-{task}"))
    callbacks = [callback, tensorboard.LocalFigures(local_figures, 1 if distributed else settings.interval_steps)]
    # A stopped container or a scaled-down pod gets SIGTERM: leave the ps at
    # once (the `with` below says goodbye) rather than make it wait out the lease.
    signal.signal(signal.SIGTERM, _stop)
    # The writers close however training ends, so that the events of its last seconds are in the files too.
    chief_figures = contextlib.closing(chief.figures) if chief else contextlib.nullcontext()
    with client, contextlib.closing(local_figures), chief_figures:
        started = time.monotonic()
        if chief:
            chief.history.start_clock()
        # The ps decides when training ends (its last round); fit runs until then.
        if distributed:
            model.fit(full_batches(x, y, settings.batch_size, settings.seed + task), epochs=1_000_000,
                      callbacks=callbacks, verbose=0)
        else:
            model.fit(x, y, batch_size=settings.batch_size, epochs=1_000_000, callbacks=callbacks, verbose=0,
                      shuffle=True)
        if not callback.syncs:  # joined after the last round (a restarted pod): nothing to add
            log.info("Training was already done (round %d); this worker had nothing to do.", client.round)
            return 0
        _log_throughput(f"Worker {task}", callback.examples_trained, time.monotonic() - started)
        if chief and callback.state:
            chief.finish(callback.state)
    epsilon = callback.example_epsilon
    privacy = "" if epsilon is None else \
        f"; its example-level DP epsilon is {epsilon:.4g} at delta {settings.dp_delta:g}"
    log.info("Worker %d is done after %d syncs, at round %d%s.", task, callback.syncs, client.round, privacy)
    return 0


def _stop(signum: int, frame: object) -> None:
    log.warning("Stopping on signal %d.", signum)
    sys.exit(128 + signum)


def _log_example_privacy(who: str, settings: WorkerSettings | TrainSettings, num_examples: int) -> bool:
    """Says what example-level DP-SGD does, if it is on; raises for a half-given or bad setting."""
    if not dpsgd.check(settings.dp_example_clip, settings.dp_example_noise_multiplier):
        return False
    log.info("%s trains with example-level DP-SGD: each example's gradient clipped to %g, noise of std %g x %g "
             "added to each batch's sum; each step accounted as a Poisson sample of %d of %d examples (the batches "
             "are shuffled, of fixed size).", who, settings.dp_example_clip, settings.dp_example_noise_multiplier,
             settings.dp_example_clip, settings.batch_size, num_examples)
    return True


def _log_throughput(who: str, examples: int, seconds: float) -> None:
    log.info("%s trained %d examples in %.2f s: %.0f examples/s.", who, examples, seconds, examples / seconds)


class _Chief:
    """Evaluates global models on the test set, reports them, and writes the outputs."""

    def __init__(self, settings: WorkerSettings, dataset: datasets.Dataset, model: keras.Model,
                 client: WorkerClient):
        self.settings = settings
        self.dataset = dataset
        self.model = model
        self.client = client
        self.x_test = prepare(dataset.x_test)
        self.history = report.History()
        self.figures = tensorboard.Scalars(tensorboard.directory(settings.output_dir))
        # The chief tests each global model on a twin of its model, in a thread of its
        # own, while it trains the next round: testing in line would hold up every
        # worker's round by the length of a test. One thread keeps the records in order.
        # The twin is seeded and built as the model was, so training draws the same
        # random numbers as it would without it.
        self.tester = _model(settings, dataset)
        self._tests = ThreadPoolExecutor(1, thread_name_prefix="comind-test")
        self._pending: list[Future] = []
        self._last_round = 0  # of the last global model received
        #: Example-level DP-SGD's epsilon of this worker's own steps (set by whoever trains with it).
        self.example_epsilon: Callable[[], float | None] = lambda: None
        self._last_received: float | None = None  # when it came (time.monotonic())

    def _eval_every(self) -> int:
        total = self.client.total_rounds or self.settings.rounds
        return self.settings.eval_every or max(1, math.ceil(total / EVALUATIONS))

    def on_round(self, state: GlobalState) -> None:
        now = time.monotonic()
        if state.round == self._last_round and self._last_received is not None:
            return  # asynchronous rounds: the version this worker trained from, still the newest
        if state.round > 0:
            # Every round with eval_every 1; else the first model past each multiple of it: under client
            # sampling the chief receives only the rounds it trains in (and the final model).
            every = self._eval_every()
            # The time since the last global model, over the rounds since: under client sampling, their mean.
            # None when no model came before this one (a resumed run; under sampling, the ps may answer the
            # chief's join with a later round's model than the initial one).
            seconds = None if self._last_received is None or state.round <= self._last_round else \
                round((now - self._last_received) / (state.round - self._last_round), 3)
            self._record(state, evaluate=state.done or state.round // every > self._last_round // every,
                         seconds=seconds)
            self._last_round = state.round
        self._last_received = now

    def _record(self, state: GlobalState, evaluate: bool, seconds: float | None = None) -> None:
        # The round's figures over every worker's update, as the ps's round line has them: this model's own
        # metrics are one worker's, and a running mean since the epoch began.
        record = report.RoundRecord(state.round, state.train_loss, state.train_accuracy,
                                    epsilon=None if math.isnan(state.epsilon) else state.epsilon,
                                    example_epsilon=self.example_epsilon(), round_seconds=seconds,
                                    server_learning_rate=None if math.isnan(state.server_learning_rate) else
                                    state.server_learning_rate,
                                    federated_eval=state.federated_eval.to_json() if state.federated_eval else None)
        for done in [f for f in self._pending if f.done()]:
            done.result()  # a test that failed stops training here
            self._pending.remove(done)
        # state.weights are this round's own arrays: training the next round does not touch them.
        self._pending.append(self._tests.submit(self._test, record, state.weights if evaluate else None))

    def _test(self, record: report.RoundRecord, weights: list[np.ndarray] | None) -> None:
        if weights is not None:
            self.tester.set_weights(weights)
            record.eval_loss, record.eval_accuracy = evaluate_model(self.tester, self.x_test, self.dataset.y_test)
            try:
                self.client.report_eval(record.round, record.eval_loss, record.eval_accuracy)
            except PsRefusal as refusal:  # the figures are the ps's to show, not a reason to stop training
                log.warning("%s; the figures stay in this worker's outputs.", refusal)
            log.info("Round %d/%d: test loss %.4f, test accuracy %.4f.", record.round, self.client.total_rounds,
                     record.eval_loss, record.eval_accuracy)
        self.history.add(record)
        self.figures.write(record.round, tensorboard.figures(record))
        if record.federated_eval:  # at the round of the model the workers tested
            self.figures.write(record.federated_eval["round"], tensorboard.federated_figures(record.federated_eval))

    def finish(self, state: GlobalState) -> None:
        """Writes the outputs, evaluating the final model first if that has not been done."""
        final = self._finish_tests()
        if final is None or final.round != state.round:
            self._record(state, evaluate=True)
            final = self._finish_tests()
        saved = self.model
        if isinstance(self.model.optimizer, SyncReplicasOptimizer):
            # It leaves every step to a ps: the saved model is the twin, compiled to train alone, with these weights.
            saved = self.tester
            saved.set_weights(state.weights)
        report.write(self.settings.output_dir, saved, self.history, self.dataset.x_test[:25],
                     self.dataset.y_test[:25], self.dataset.class_names)

    def _finish_tests(self) -> report.RoundRecord | None:
        """Waits for the tests in flight (raising what one raised); returns the last tested record."""
        for pending in self._pending:
            pending.result()
        self._pending.clear()
        return self.history.final


def run_train(settings: TrainSettings) -> int:
    """Trains on one machine, without a ps: the baseline the federated runs compare with."""
    dataset = datasets.load(settings.dataset, settings.data_dir)
    x, y = prepare(dataset.x_train), dataset.y_train
    x_test = prepare(dataset.x_test)
    model = _model(settings, dataset)
    steps = settings.steps or presets.STEPS.get(settings.dataset, presets.DEFAULT_STEPS)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    epochs = math.ceil(steps / steps_per_epoch)  # the last one stops short, at `steps`
    history = report.History()
    accountant = None
    if _log_example_privacy("One process", settings, len(x)):
        assert settings.dp_example_clip is not None and settings.dp_example_noise_multiplier is not None
        dpsgd.ExampleLevelPrivacy(settings.dp_example_clip, settings.dp_example_noise_multiplier).install(model)
        accountant = dpsgd.ExampleAccountant(settings.dp_example_noise_multiplier, settings.batch_size, len(x),
                                             settings.dp_delta)
    figures = tensorboard.Scalars(tensorboard.directory(settings.output_dir))
    began = 0.0  # the epoch, in history's clock: its duration leaves out the test after it

    def on_epoch_begin(epoch: int, logs: dict) -> None:
        nonlocal began
        began = history.elapsed

    def on_train_batch_end(batch: int, logs: dict) -> None:
        if accountant:
            accountant.step()
        if int(model.optimizer.iterations) >= steps:
            model.stop_training = True

    def on_epoch_end(epoch: int, logs: dict) -> None:
        seconds = round(history.elapsed - began, 3)
        loss, accuracy = evaluate_model(model, x_test, dataset.y_test)
        record = report.RoundRecord(epoch + 1, logs["loss"], logs.get("accuracy", math.nan), loss, accuracy,
                                    example_epsilon=accountant.epsilon if accountant else None,
                                    round_seconds=seconds)
        history.add(record)
        figures.write(record.round, tensorboard.figures(record))
        privacy = f", {accountant.describe()}" if accountant else ""
        print(f"epoch {epoch + 1}/{epochs}: train loss {logs['loss']:.4f}, test loss {loss:.4f}, "
              f"test accuracy {accuracy:.4f}{privacy}", flush=True)

    history.start_clock()
    with contextlib.closing(figures):
        model.fit(x, y, batch_size=settings.batch_size, epochs=epochs, verbose=0, shuffle=True,
                  callbacks=[keras.callbacks.LambdaCallback(on_epoch_begin=on_epoch_begin,
                                                            on_train_batch_end=on_train_batch_end,
                                                            on_epoch_end=on_epoch_end)])
    whole_epochs, rest = divmod(steps, steps_per_epoch)
    _log_throughput("One process", whole_epochs * len(x) + rest * settings.batch_size, history.elapsed)
    report.write(settings.output_dir, model, history, dataset.x_test[:25], dataset.y_test[:25],
                 dataset.class_names, x_label="epoch")
    return 0
