"""TensorBoard event files: the chief's figures per round, and each worker's local training figures.

Under ``OUTPUT_DIR/tensorboard`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``):

* the run ``.``, written by the chief (and by `comind train`, per epoch): at
  step r, round r's ``train/loss`` and ``train/accuracy`` (the ps's
  example-weighted mean over the round's updates), ``test/loss`` and
  ``test/accuracy`` (the chief's test of the global model, in the rounds it
  tested), ``round/seconds``, ``server/learning_rate`` (the ps's server
  optimizer's eta), with worker-level DP ``privacy/epsilon`` (the ps's
  ledger) and with example-level DP-SGD ``privacy/example_epsilon`` (the
  chief's own ledger): the figures of ``metrics.json``; with federated evaluation, at the round of the
  model the workers tested, ``federated/accuracy_min`` (``_median``,
  ``_max``, ``_mean``) and ``federated/loss_*`` likewise;
* ``worker-N``, written by worker N: ``local/loss`` and ``local/accuracy``
  as Keras reports them, once per round (every ``interval_steps`` local
  steps, the figures that go with the worker's update), the step the
  worker's local step count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from comind.federated_eval import STATISTICS
from comind.report import RoundRecord

log = logging.getLogger(__name__)

#: The folder under the output folder.
DIRECTORY = "tensorboard"
#: Events reach the file at least this often while training writes them (TensorFlow's default is 2 minutes).
FLUSH_MILLIS = 10_000

# What tf.summary.scalar writes: a float32 scalar with the scalars plugin's metadata. tf.summary.scalar is
# TensorBoard's own code and refuses to run without it, so the summaries are built here and written with
# TensorFlow's tf.summary.experimental.write_raw_pb: reading them needs TensorBoard, writing them does not.
# One op per write, whatever the number of values: a tf.summary.write each took about 0.2 ms more per value.
_SCALAR = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
_SCALAR_SHAPE = tensor_shape_pb2.TensorShapeProto()


def directory(output_dir: str | Path, run: str = "") -> Path:
    """The folder of one run's event files: the chief's (``run`` empty) or a worker's (``worker-N``)."""
    return Path(output_dir) / DIRECTORY / run


class Scalars:
    """One run's scalar series, written by one writer; close it to write out the rest."""

    def __init__(self, folder: Path):
        try:
            self._writer = tf.summary.create_file_writer(str(folder), flush_millis=FLUSH_MILLIS)
        except tf.errors.OpError as error:
            # The events are an extra, never a reason not to train: a worker whose output folder is read-only
            # (compose's worker-1 has none mounted) trains without them.
            log.warning("No TensorBoard events: %s cannot be written (%s).", folder, error.message)
            self._writer = tf.summary.create_noop_writer()

    def write(self, step: int, values: Mapping[str, float | None]) -> None:
        """Writes each value at ``step``; None and NaN (a figure the round does not have) are left out."""
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, metadata=_SCALAR, tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, tensor_shape=_SCALAR_SHAPE, float_val=[value]))
            for tag, value in values.items() if value is not None and not math.isnan(value)])
        if summary.value:
            with self._writer.as_default():
                tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)

    def close(self) -> None:
        self._writer.close()


def figures(record: RoundRecord) -> dict[str, float | None]:
    """A round's figures under their tags."""
    return {"train/loss": record.train_loss, "train/accuracy": record.train_accuracy,
            "test/loss": record.eval_loss, "test/accuracy": record.eval_accuracy,
            "round/seconds": record.round_seconds, "privacy/epsilon": record.epsilon,
            "server/learning_rate": record.server_learning_rate, "privacy/example_epsilon": record.example_epsilon}


def federated_figures(evaluation: Mapping[str, Any]) -> dict[str, float | None]:
    """A federated evaluation's distributions (as metrics.json has them) under their tags."""
    return {f"federated/{figure}_{statistic}": evaluation[figure][statistic]
            for figure in ("accuracy", "loss") for statistic in STATISTICS}


class LocalFigures(keras.callbacks.Callback):
    """Writes a worker's training loss and accuracy, as Keras reports them, every ``every`` local steps.

    Once per round (``every`` the sync interval) rather than every step: a write costs about 0.2 ms of
    eager TensorFlow, which every step of a small model would pay.
    """

    def __init__(self, scalars: Scalars, every: int):
        super().__init__()
        self.scalars = scalars
        self.every = every
        self.steps = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            logs = logs or {}
            self.scalars.write(self.steps, {f"local/{name}": float(logs[name]) for name in ("loss", "accuracy")
                                            if name in logs})
