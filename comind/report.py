"""What the chief leaves behind: the final model, its metrics, and two pictures.

* ``model.keras``: the final global model.
* ``metrics.json``: loss and accuracy per round (training: the ps's figures for
  the round, the example-weighted mean over its updates; test: the chief's
  evaluation of the global model), worker-level DP's ``epsilon`` after each
  round (the ps's ledger; null without DP), example-level DP-SGD's
  ``example_epsilon`` of this process's own steps (null without it),
  ``round_seconds`` (how long the round took, as the chief saw it), the
  server optimizer's ``server_learning_rate``, with federated evaluation the
  workers' tests of the previous round's model (``federated_eval``), and the
  final evaluation.
* ``predictions.png``: 25 test images with predicted and true labels, green
  when right and red when wrong, as in the original tutorials.
* ``history.png``: loss and accuracy per round.

Every file is written atomically, at the end. The same figures go to
TensorBoard's event files round by round (:mod:`comind.tensorboard`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# Figures without pyplot: no global backend to choose or state to close, so
# the same functions draw into files on a server and inline in a notebook.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from comind import atomic

if TYPE_CHECKING:
    import keras


@dataclasses.dataclass
class RoundRecord:
    round: int
    train_loss: float
    train_accuracy: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    #: Worker-level DP's epsilon after the round, from the ps's ledger; None without DP.
    epsilon: float | None = None
    #: Example-level DP-SGD's epsilon of this process's own training so far (its ledger); None without it.
    example_epsilon: float | None = None
    #: How long the round (the epoch) took; None where it is not known (the chief's first model, if not round 0's).
    round_seconds: float | None = None
    #: The ps's server optimizer's learning rate eta in the round; None where there is none (one process).
    server_learning_rate: float | None = None
    #: The federated evaluation the round brought in, of the previous round's model (its ``round``): the
    #: distributions over the workers and each worker's figures by task index
    #: (:meth:`comind.federated_eval.Evaluation.to_json`); None in the other rounds.
    federated_eval: dict | None = None
    elapsed_seconds: float = 0.0  # since training started, when this record was made


@dataclasses.dataclass
class History:
    records: list[RoundRecord] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)

    def start_clock(self) -> None:
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, record: RoundRecord) -> None:
        record.elapsed_seconds = round(self.elapsed, 3)
        self.records.append(record)

    @property
    def final(self) -> RoundRecord | None:
        evaluated = [r for r in self.records if r.eval_accuracy is not None]
        return evaluated[-1] if evaluated else None


def write(output_dir: str | Path, model: keras.Model, history: History, images: np.ndarray, labels: np.ndarray,
          class_names: tuple[str, ...], x_label: str = "round") -> Path:
    """Writes the model, metrics and pictures into ``output_dir``, and says so on stdout."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(directory / "model.keras") as temporary:
        model.save(temporary)
    final = history.final
    with atomic.replacing(directory / "metrics.json") as temporary:
        temporary.write_text(json.dumps({
            "final": dataclasses.asdict(final) if final else None,
            "rounds": [dataclasses.asdict(r) for r in history.records],
        }, indent=2) + "\n")
    from comind.evaluation import predict

    predicted = np.argmax(predict(model, images), axis=-1)
    _save(directory / "predictions.png", predictions_figure(images, labels, predicted, class_names))
    _save(directory / "history.png", history_figure(history, x_label))
    if final is None:  # no record was tested
        print(f"No test accuracy: no {x_label} was tested; model, metrics and pictures in {directory}", flush=True)
    else:
        print(f"Final test accuracy {final.eval_accuracy:.4f} (loss {final.eval_loss:.4f}) after {x_label} "
              f"{final.round}; model, metrics and pictures in {directory}", flush=True)
    return directory


def predictions_figure(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                       class_names: tuple[str, ...]) -> Figure:
    figure = Figure(figsize=(10, 10))
    for i in range(min(25, len(images))):
        axes = figure.add_subplot(5, 5, i + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        image = images[i]
        axes.imshow(image, cmap="binary" if image.ndim == 2 else None)
        right = predicted[i] == labels[i]
        axes.set_xlabel(f"{class_names[predicted[i]]} ({class_names[labels[i]]})",
                        color="green" if right else "red")
    figure.suptitle("Predicted (true) labels of the first 25 test images")
    return figure


def history_figure(history: History, x_label: str = "round") -> Figure:
    figure = Figure(figsize=(12, 4.5))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    rounds = [r.round for r in history.records]
    evaluated = [r for r in history.records if r.eval_loss is not None]
    for axes, what in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(rounds, [getattr(r, f"train_{what}") for r in history.records], label="train")
        axes.plot([r.round for r in evaluated], [getattr(r, f"eval_{what}") for r in evaluated], "o-",
                  label="test (global model)")
        axes.set_xlabel(x_label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 2.5
        axes.set_ylabel(what)
        axes.grid(alpha=0.3)
        axes.legend()
    accuracy_axes.set_ylim(0, 1)  # the whole scale: no accuracy past 1.0 on the axis, and runs compare at a glance
    figure.suptitle(f"Loss and accuracy per {x_label}")
    figure.tight_layout()
    return figure


def _save(path: Path, figure: Figure) -> None:
    with atomic.replacing(path) as temporary:
        figure.savefig(temporary, dpi=100)
