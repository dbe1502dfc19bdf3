"""The chief's pictures: what a user reads off them."""

from __future__ import annotations

from comind import report


def test_history_has_whole_rounds_on_its_axes_and_accuracy_from_0_to_1():
    history = report.History()
    for round, accuracy in ((1, 0.5), (2, 0.9), (3, 1.0)):
        history.add(report.RoundRecord(round, 1 / round, accuracy, 1.5 / round, accuracy - 0.1))
    loss_axes, accuracy_axes = report.history_figure(history).axes
    for axes in (loss_axes, accuracy_axes):
        ticks = [tick for tick in axes.get_xticks() if 1 <= tick <= 3]
        assert ticks == [1, 2, 3], ticks  # not 1.0, 1.25, 1.5, ...
    assert accuracy_axes.get_ylim() == (0, 1)
