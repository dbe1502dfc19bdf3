"""What a worker's calls to the ps can fail with; importable without gRPC or NumPy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class PsRefusal(RuntimeError):
    """The ps refused a request for a reason retrying cannot fix.

    ``code`` is the ``grpc.StatusCode`` it answered with.
    """

    def __init__(self, what: str, code: grpc.StatusCode, details: str):
        super().__init__(f"The ps refused {what}: {details} (status {code.name})")
        self.code = code


class PsUnreachable(ConnectionError):
    """The ps did not answer for longer than the worker's patience."""


class ModelMismatch(ValueError):
    """This worker's model and the ps's global model differ in dtype or shape."""


class ProtocolError(ValueError):
    """The ps answered with something the protocol does not allow: it is broken,
    hostile, or of another coMind version."""
