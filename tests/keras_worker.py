"""A worker process for tests: model.fit with the FederatedAveraging callback.

Writes, as JSON, how many times it synced and a digest of the weights it
held right after each sync, so a test can compare them with the ps's
checkpoints.

    python tests/keras_worker.py ADDRESS TASK_INDEX --examples N --epochs E --interval I --out FILE
"""

import argparse
import hashlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import comind
from comind import datasets, models
from comind.worker import prepare


def digest(arrays) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("task_index", type=int)
    parser.add_argument("--examples", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--interval", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data = datasets.load("digits")
    start = args.task_index * args.examples
    x, y = prepare(data.x_train[start:start + args.examples]), data.y_train[start:start + args.examples]
    keras.utils.set_random_seed(args.task_index)  # different initial weights: the chief's must win
    model = models.build("basic", data.input_shape, data.num_classes)
    held = {}

    def on_round(state: comind.GlobalState) -> None:
        held[state.round] = digest(model.get_weights())

    with comind.WorkerClient(args.address, task_index=args.task_index) as client:
        callback = comind.FederatedAveraging(client, interval_steps=args.interval, batch_size=args.batch_size,
                                             on_round=on_round)
        model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, callbacks=[callback], verbose=0)
    with open(args.out, "w") as out:
        json.dump({"syncs": callback.syncs, "held": held}, out)


if __name__ == "__main__":
    main()
