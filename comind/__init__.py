"""coMind: federated averaging for Keras models across separate machines."""

from typing import TYPE_CHECKING, Any

from comind.errors import ModelMismatch, PsRefusal, PsUnreachable

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from comind.client import GlobalState, WorkerClient
    from comind.federated import FederatedAveraging, FederatedAveragingOptimizer
    from comind.sync_replicas import SyncReplicasOptimizer

__all__ = ["FederatedAveraging", "FederatedAveragingOptimizer", "GlobalState", "ModelMismatch", "PsRefusal",
           "PsUnreachable", "SyncReplicasOptimizer", "WorkerClient"]
__version__ = "0.1.0"

# Imported on first use: the client brings gRPC and NumPy, the Keras side
# TensorFlow, and neither is needed to, say, check a container's health.
_LAZY = {"WorkerClient": "comind.client", "GlobalState": "comind.client",
         "FederatedAveraging": "comind.federated", "FederatedAveragingOptimizer": "comind.federated",
         "SyncReplicasOptimizer": "comind.sync_replicas"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'comind' has no attribute {name!r}")
