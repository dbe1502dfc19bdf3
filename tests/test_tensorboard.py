"""TensorBoard event files: what a round's record becomes, and a folder that cannot be written."""

from __future__ import annotations

import contextlib
import logging
import math

from comind import tensorboard
from comind.report import RoundRecord
from events import tensorboard_scalars


def test_a_rounds_figures_are_written_at_its_round_and_those_it_lacks_are_left_out(tmp_path):
    with contextlib.closing(tensorboard.Scalars(tmp_path)) as scalars:
        scalars.write(1, tensorboard.figures(RoundRecord(1, 0.5, math.nan, epsilon=2.25, round_seconds=0.125)))
        scalars.write(2, tensorboard.figures(RoundRecord(2, 0.25, 0.875, 0.375, 0.75, epsilon=3.5,
                                                         server_learning_rate=0.5, example_epsilon=1.5)))
    assert tensorboard_scalars(tmp_path) == {
        "train/loss": {1: 0.5, 2: 0.25}, "train/accuracy": {2: 0.875}, "test/loss": {2: 0.375},
        "test/accuracy": {2: 0.75}, "privacy/epsilon": {1: 2.25, 2: 3.5}, "privacy/example_epsilon": {2: 1.5},
        "round/seconds": {1: 0.125}, "server/learning_rate": {2: 0.5}}


def test_a_folder_that_cannot_be_written_leaves_training_without_events_and_says_so(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "tensorboard"
    with caplog.at_level(logging.WARNING), contextlib.closing(tensorboard.Scalars(folder)) as scalars:
        scalars.write(1, {"train/loss": 0.5})
    assert f"No TensorBoard events: {folder} cannot be written" in caplog.text
    assert (tmp_path / "a-file").read_text() == ""
