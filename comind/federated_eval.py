"""Federated evaluation: every worker tests the global model on its own held-out examples.

On non-IID data the chief's test accuracy is one number for the whole
population, and hides the worker the model serves worst; Flower's federated
evaluation round shows each client's. Here, with ``--federated-eval-every N``
on the ps (announced at join), each worker tests the global model of every
round that is a multiple of N, before it trains from it, on the examples it
holds out of its shard (``--eval-fraction``, :func:`comind.sharding.hold_out`),
and its next update carries the figures: no call of its own (one call per
worker per round, docs/design.md decision 12). The reports of round R's model
come in with the updates of round R + 1; when that round closes the ps
summarises them (:class:`Evaluation`), exports the distribution as metrics and
sends it down with the new model, so the chief writes it into metrics.json.

A report is the worker's own claim, checked as an update's figures are
(:meth:`Collector.check`): finite, accuracy in [0, 1], loss >= 0, at least
one example, and of the model the update trained from, in a round the ps
asked for. It counts once per worker and round because it rides with the
update, which does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from comind import refusals
from comind.proto import comind_pb2 as pb

#: The statistics of each figure's distribution over the workers: ``comind_federated_eval_*{statistic}``.
STATISTICS = ("min", "median", "max", "mean")


def due(round: int, every: int) -> bool:
    """Whether the global model of ``round`` is to be tested by every worker (``every`` 0: never)."""
    return every > 0 and round % every == 0


@dataclasses.dataclass(frozen=True)
class Report:
    """One worker's test of the global model of ``round`` on its ``num_examples`` held-out examples."""

    round: int
    loss: float
    accuracy: float
    num_examples: int


def from_proto(message: pb.FederatedEvalReport) -> Report:
    return Report(message.round, message.loss, message.accuracy, message.num_examples)


def to_proto(report: Report) -> pb.FederatedEvalReport:
    return pb.FederatedEvalReport(round=report.round, loss=report.loss, accuracy=report.accuracy,
                                  num_examples=report.num_examples)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A figure over the workers: its least, median and largest value (each worker counted once), and its mean
    weighted by each worker's held-out examples (the figure of all their examples together)."""

    min: float
    median: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: np.ndarray, weights: np.ndarray) -> Distribution:
        return cls(float(np.min(values)), float(np.median(values)), float(np.max(values)),
                   float(np.average(values, weights=weights)))


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The workers' tests of the global model of ``round``, by task index."""

    round: int
    workers: Mapping[int, Report]

    @property
    def num_examples(self) -> int:
        return sum(r.num_examples for r in self.workers.values())

    def distribution(self, figure: str) -> Distribution:
        """The distribution of ``loss`` or ``accuracy`` over the workers."""
        reports = self.workers.values()
        return Distribution.of(np.array([getattr(r, figure) for r in reports]),
                               np.array([r.num_examples for r in reports], dtype=np.float64))

    def to_json(self) -> dict:
        """As metrics.json has it: the distributions, and each worker's figures under its task index."""
        return {"round": self.round, "num_workers": len(self.workers), "num_examples": self.num_examples,
                **{figure: dataclasses.asdict(self.distribution(figure)) for figure in ("loss", "accuracy")},
                "workers": {str(task): {"loss": r.loss, "accuracy": r.accuracy, "num_examples": r.num_examples}
                            for task, r in sorted(self.workers.items())}}


class Collector:
    """The ps's side: checks each report, keeps those of the open round, and summarises them when it closes.

    Args:
        every: the rounds between evaluations (``--federated-eval-every``); 0 turns them off.
        max_examples: the most held-out examples a report may claim (the ps's bound on an update's examples).
    """

    def __init__(self, every: int, max_examples: int):
        self.every = every
        self.max_examples = max_examples
        self._reports: dict[int, Report] = {}

    def check(self, report: Report | None, update_round: int) -> None:
        """Refuses a bad report that comes with the update for ``update_round``; None (no report) is fine.

        Raises:
            InvalidRequest: the ps asked for no test of that model.
            NotFinite: a figure is NaN or Inf.
            OutOfRange: an accuracy outside [0, 1], a negative loss, or a count of examples out of bounds.
        """
        if report is None:
            return
        tested = update_round - 1
        if report.round != tested or not due(tested, self.every):
            asked = (f"the ps asks for tests of the rounds that are multiples of {self.every} "
                     f"(COMIND_FEDERATED_EVAL_EVERY)" if self.every else "the ps asks for none (COMIND_FEDERATED_"
                     "EVAL_EVERY is 0)")
            raise refusals.InvalidRequest(
                f"A federated evaluation report goes with the update trained from the model it tested, round "
                f"{tested} here, and {asked}. Received: a report of round {report.round}")
        if not (math.isfinite(report.loss) and math.isfinite(report.accuracy)):
            raise refusals.NotFinite(f"A federated evaluation's loss and accuracy must be finite numbers. Received: "
                                     f"loss={report.loss}, accuracy={report.accuracy}")
        if not (0 <= report.accuracy <= 1 and report.loss >= 0 and 1 <= report.num_examples <= self.max_examples):
            raise refusals.OutOfRange(
                f"A federated evaluation has an accuracy in [0, 1], a loss >= 0 and 1 to {self.max_examples} "
                f"examples (COMIND_MAX_EXAMPLES_PER_UPDATE). Received: accuracy={report.accuracy}, "
                f"loss={report.loss}, num_examples={report.num_examples}")

    def add(self, task_index: int, report: Report) -> None:
        """Keeps a checked report whose update the open round took."""
        self._reports[task_index] = report

    def close(self, round: int) -> Evaluation | None:
        """The evaluation that round ``round``'s updates brought in (of the model of ``round - 1``), if any."""
        reports, self._reports = self._reports, {}
        return Evaluation(round - 1, reports) if reports else None
