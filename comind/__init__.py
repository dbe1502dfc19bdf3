"""coMind: federated averaging for Keras models across separate machines."""

from comind.client import GlobalState, ModelMismatch, PsRefusal, PsUnreachable, WorkerClient

__all__ = ["FederatedAveraging", "FederatedAveragingOptimizer", "GlobalState", "ModelMismatch", "PsRefusal",
           "PsUnreachable", "WorkerClient"]
__version__ = "0.1.0"

_KERAS_SIDE = ("FederatedAveraging", "FederatedAveragingOptimizer")


def __getattr__(name: str):
    # The Keras side imports TensorFlow; the ps imports this package and must not.
    if name in _KERAS_SIDE:
        from comind import federated

        return getattr(federated, name)
    raise AttributeError(f"module 'comind' has no attribute {name!r}")
