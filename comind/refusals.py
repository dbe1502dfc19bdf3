"""What the ps refuses, as domain errors: the ps's core raises them, ``service.py`` alone maps them to gRPC
statuses. Every refusal leaves the ps's state as it was."""

from __future__ import annotations


class Refusal(Exception):
    """A request the ps will not carry out.

    ``result`` is the ``comind_updates_total`` label when the request was an update; ``retry_after``, when
    set, the seconds after which the same request may succeed (the worker waits that long, then retries).
    """

    result = "rejected"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class UnknownMember(Refusal):
    """A member id the ps does not know: its lease ended, or the ps restarted. Join again."""


class ForeignCertificate(Refusal):
    """A member id used over another client certificate than the one that registered it (mutual TLS)."""


class NotChief(Refusal):
    """A request only the chief (task 0) may make: reporting an evaluation of the global model."""


class TaskTaken(Refusal):
    """A registration for a task index that a live member of another worker process holds."""


class TooManyMembers(Refusal):
    """A registration while the ps has as many members as it allows."""


class TooManyJoins(Refusal):
    """A registration faster than the ps takes them."""


class NoModelYet(Refusal):
    """Nothing to train from: the chief has not given the initial model."""


class InvalidRequest(Refusal):
    """A malformed message, or a model of another layout than the ps's."""


class ModelTooLarge(Refusal):
    """A header that declares more bytes than the ps accepts."""


class NotFinite(Refusal):
    """NaN or Inf in an update, a loss or an accuracy."""


class OutOfRange(Refusal):
    """A figure outside the range it has: an accuracy past 1, a negative loss or count."""


class TruncatedStream(Refusal):
    """A stream that ended before the bytes its header declared."""


class OversizedStream(Refusal):
    """A stream with more bytes than its header declared."""


class Busy(Refusal):
    """The ps was receiving or sending other models for as long as this transfer may take; retry."""

    result = "busy"


class TooSlow(Refusal):
    """A transfer that took longer than its size allows."""


class NotServing(Refusal):
    """The ps is stopping (it could not write a checkpoint)."""
