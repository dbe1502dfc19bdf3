"""coMind: federated averaging for Keras models across separate machines."""

from comind.client import GlobalState, ModelMismatch, PsRefusal, PsUnreachable, WorkerClient

__all__ = ["GlobalState", "ModelMismatch", "PsRefusal", "PsUnreachable", "WorkerClient"]
__version__ = "0.1.0"
