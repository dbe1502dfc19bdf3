"""A worker process for distributed-mode tests: ``model.fit`` with SyncReplicasOptimizer, on its part of each batch.

Step ``t``'s combined batch is examples ``[t W B, (t + 1) W B)`` of
:func:`combined_batches` (``W`` workers, ``B`` examples each); worker ``k``
trains on the ``k``-th ``B`` of each, in order. It writes the global model it
ends with, and the chief also its initial weights, to an ``.npz`` file.

    python tests/sync_replicas_worker.py ADDRESS TASK_INDEX --workers W --batch-size B --steps S --out FILE
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comind
from comind import models

#: Fashion-MNIST's shape and classes: the basic model's data.
SHAPE, CLASSES = (28, 28), 10


def combined_batches(steps: int, workers: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every step's combined batch, one after another: Fashion-MNIST-shaped images and their labels."""
    rng = np.random.default_rng(7)
    count = steps * workers * batch_size
    return rng.random((count, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("task_index", type=int)
    for count in ("--workers", "--batch-size", "--steps"):
        parser.add_argument(count, type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    x, y = combined_batches(args.steps, args.workers, args.batch_size)
    mine = np.arange(len(x)).reshape(args.steps, args.workers, args.batch_size)[:, args.task_index].ravel()
    keras.utils.set_random_seed(args.task_index)  # different initial weights: the chief's must win
    model = models.build("basic", SHAPE, CLASSES, optimizer=comind.SyncReplicasOptimizer())
    initial = model.get_weights()
    with comind.WorkerClient(args.address, task_index=args.task_index) as client:
        callback = comind.FederatedAveraging(client, batch_size=args.batch_size)
        model.fit(x[mine], y[mine], batch_size=args.batch_size, epochs=1, shuffle=False, callbacks=[callback],
                  verbose=0)
    np.savez(args.out, **{f"final_{i}": w for i, w in enumerate(model.get_weights())},
             **{f"initial_{i}": w for i, w in enumerate(initial)})


if __name__ == "__main__":
    main()
