"""The stages of a round of secure aggregation, in order."""

from __future__ import annotations

import enum

from comind.secagg.errors import WrongStage


class Stage(enum.Enum):
    ADVERTISE = "advertise keys"
    SHARE = "share keys"
    MASKED_INPUT = "masked input"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


def expect(actual: Stage, expected: Stage, what: str) -> None:
    if actual is not expected:
        raise WrongStage(f"{what} belongs to the stage '{expected.value}', and the round is at "
                         f"'{actual.value}'. Received: a message for the wrong stage")
