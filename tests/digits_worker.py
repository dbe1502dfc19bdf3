"""A worker process for the poisoning tests: softmax regression on the embedded digits, in NumPy.

Each round it takes ``--steps`` steps of minibatch SGD on its IID shard of
the digits and pushes the result; the chief (task 0) writes the test
accuracy of the final global model as JSON. With ``--poison`` it is the
attacker instead: it trains the same way, then pushes its weights times 100
(``scaled``) or random weights (``random``), every round.

    python tests/digits_worker.py ADDRESS TASK_INDEX --num-workers N [--poison scaled|random] [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comind import WorkerClient, datasets, sharding

CLASSES, FEATURES = 10, 64
SCALE = 100.0
RANDOM_STD = 1.0
#: Random initial weights, as a Keras layer draws them: from zeros, a single
#: round already makes a good classifier, which would hide what a poisoned
#: worker that freezes the model at its first round does.
INIT_STD = 0.3


def features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255


def sgd(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, steps: int, rng: np.random.Generator,
        batch_size: int = 32, learning_rate: float = 0.5) -> list[np.ndarray]:
    kernel, bias = (w.copy() for w in weights)
    for _ in range(steps):
        batch = rng.choice(len(x), batch_size, replace=False)
        logits = x[batch] @ kernel + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        probabilities[np.arange(batch_size), y[batch]] -= 1  # the cross-entropy's gradient in the logits
        kernel -= learning_rate * x[batch].T @ probabilities / batch_size
        bias -= learning_rate * probabilities.mean(axis=0)
    return [kernel, bias]


def accuracy(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    kernel, bias = weights
    return float(np.mean(np.argmax(x @ kernel + bias, axis=1) == y))


def poisoned(weights: list[np.ndarray], poison: str, rng: np.random.Generator) -> list[np.ndarray]:
    if poison == "scaled":
        return [w * np.float32(SCALE) for w in weights]
    return [rng.normal(0, RANDOM_STD, w.shape).astype(np.float32) for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("task_index", type=int)
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10, help="local SGD steps per round")
    parser.add_argument("--poison", choices=("scaled", "random"))
    parser.add_argument("--out")
    args = parser.parse_args()
    data = datasets.load("digits")
    mine = sharding.shard(data.y_train, args.num_workers, args.task_index, "iid")
    x, y = features(data.x_train[mine]), data.y_train[mine]
    rng = np.random.default_rng(args.task_index)
    with WorkerClient(args.address, task_index=args.task_index) as client:
        initial = np.random.default_rng(1234).normal(0, INIT_STD, (FEATURES, CLASSES)).astype(np.float32)
        state = client.join([initial, np.zeros(CLASSES, np.float32)])
        while not state.done:
            weights = sgd(state.weights, x, y, args.steps, rng)
            if args.poison:
                weights = poisoned(weights, args.poison, rng)
            state = client.sync(weights, num_examples=len(x))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "round": state.round, "accuracy": accuracy(state.weights, features(data.x_test), data.y_test)}))


if __name__ == "__main__":
    main()
