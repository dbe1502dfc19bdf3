"""Federated averaging in a custom training loop, with FederatedAveragingOptimizer.

Start a ps, then one of these per worker:

    comind ps --num-workers 2 --rounds 30 &
    python examples/custom_loop.py --task-index 0 &
    python examples/custom_loop.py --task-index 1

Each worker trains the basic classifier on its half of the embedded digits
with its own GradientTape loop; every ``--interval-steps`` steps the wrapper
averages the weights through the ps, until the ps says training is done.
When the ps asks for federated evaluation (``comind ps
--federated-eval-every N``), each worker holds ``--eval-fraction`` of its
shard out of training, and the wrapper tests the global model on it every N
rounds.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import comind
from comind import datasets, models, sharding
from comind.evaluation import predict
from comind.worker import prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ps-address", default="localhost:2222")
    parser.add_argument("--task-index", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--interval-steps", type=int, default=20)
    parser.add_argument("--shard", default="contiguous", choices=sharding.METHODS)
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args()

    data = datasets.load("digits")
    mine = sharding.shard(data.y_train, args.num_workers, args.task_index, args.shard, args.dirichlet_alpha)
    model = models.basic(data.input_shape, data.num_classes)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()

    with comind.WorkerClient(args.ps_address, task_index=args.task_index) as client:
        client.connect()  # to learn whether the ps asks for federated evaluation
        held_out = None
        if client.federated_eval_every:
            mine, tested = sharding.hold_out(mine, args.eval_fraction, index=args.task_index)
            held_out = prepare(data.x_train[tested]), data.y_train[tested]
        batches = (tf.data.Dataset.from_tensor_slices((prepare(data.x_train[mine]), data.y_train[mine]))
                   .shuffle(len(mine), seed=args.task_index).batch(32).repeat())
        optimizer = comind.FederatedAveragingOptimizer(keras.optimizers.Adam(1e-3), model, client,
                                                       interval_steps=args.interval_steps, num_examples=len(mine),
                                                       eval_data=held_out, eval_loss=cross_entropy)
        optimizer.start()  # every worker now holds the chief's initial weights
        for x, y in batches:
            with tf.GradientTape() as tape:
                probabilities = model(x, training=True)
                loss = cross_entropy(y, probabilities)
            # The step's figures make the ps's round line; without the accuracy it reads 0.
            accuracy = float(np.mean(np.argmax(probabilities, axis=-1) == y.numpy()))
            optimizer.apply(tape.gradient(loss, model.trainable_variables), num_examples=len(x), loss=float(loss),
                            accuracy=accuracy)
            if optimizer.done:
                break
        optimizer.finish()
        if client.is_chief:
            accuracy = np.mean(np.argmax(predict(model, prepare(data.x_test)), axis=-1) == data.y_test)
            print(f"Round {optimizer.state.round}: test accuracy {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
