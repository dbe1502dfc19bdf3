"""What secure aggregation refuses, and how a round of it fails: domain errors, mapped to statuses by
``service.py`` alone. Every refusal leaves the state of the party or the ps that refuses as it was."""

from __future__ import annotations

from comind.refusals import Refusal


class SecAggRefusal(Refusal):
    """A secure-aggregation message that breaks the protocol; ``result`` labels it in the metrics."""

    result = "secagg_refused"


class WrongStage(SecAggRefusal):
    """A message for another stage than the one the round is at."""


class WrongRound(SecAggRefusal):
    """A message of another round than the open one: replayed, or from an earlier round."""


class NotAParty(SecAggRefusal):
    """A message from, or about, a worker that is not a party of the round (or is no longer one)."""


class KeyAdvertisedTwice(SecAggRefusal):
    """A second advertisement of keys by one party, or a public key another party already advertised."""


class DuplicateMessage(SecAggRefusal):
    """A second message of one kind from one party in a stage: a replay."""


class MisaddressedShare(SecAggRefusal):
    """A share whose envelope names another sender or recipient than the one it came from or goes to, or a
    recipient that is not the sender's neighbour."""


class ForgedShare(SecAggRefusal):
    """A share that does not decrypt: tampered with, or encrypted under another round's or pair's key."""


class InvalidMessage(SecAggRefusal):
    """A malformed secure-aggregation message: a key, share or masked input of the wrong size."""


class RangeExceeded(ValueError):
    """An update with a coordinate outside the clipping range: its sum could wrap the ring."""


class TooFewSurvivors(Exception):
    """Fewer parties than the threshold remain, or a secret lacks the shares to rebuild it: the round cannot be
    unmasked. The previous model stands and the round starts again."""


class RoundFailed(Refusal):
    """The attempt at a round that this call was part of failed for lack of survivors: send the update again, to a
    new attempt at the round (with new keys)."""

    def __init__(self, message: str):
        super().__init__(message, retry_after=0.0)
