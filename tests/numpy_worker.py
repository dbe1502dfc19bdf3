"""A worker process for tests: "trains" by adding a fixed delta, logs every round.

Each global model it receives is written as one JSON line, so a test can
check the whole history: rounds in order, and weights equal to what exact
example-weighted federated averaging gives.

    python tests/numpy_worker.py ADDRESS TASK_INDEX --examples N --delta D --out FILE

With ``--delta-step S`` the delta grows by S a round (D + S x round), so that a
server optimizer's moments see a different aggregate every round.
"""

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comind import WorkerClient

SHAPES = [(100, 10), (10,)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("task_index", type=int)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--delta", type=float, default=1.0)
    parser.add_argument("--delta-step", type=float, default=0.0, help="added to the delta each round")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of pretend training per round")
    parser.add_argument("--token", default=None)
    parser.add_argument("--rows", type=int, default=SHAPES[0][0], help="rows of the first tensor (its size)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.task_index} %(levelname)s %(message)s")
    with WorkerClient(args.address, task_index=args.task_index, token=args.token) as client, \
            open(args.out, "a", buffering=1) as out:
        shapes = [(args.rows, *SHAPES[0][1:]), *SHAPES[1:]]
        state = client.join([np.zeros(shape, np.float32) for shape in shapes])
        while True:
            out.write(json.dumps({"round": state.round, "done": state.done,
                                  "values": [float(w.ravel()[0]) for w in state.weights],
                                  "uniform": all(bool((w == w.ravel()[0]).all()) for w in state.weights),
                                  "epsilon": None if math.isnan(state.epsilon) else state.epsilon}) + "\n")
            if state.done:
                break
            time.sleep(args.pause)  # stands in for local training
            delta = np.float32(args.delta + args.delta_step * state.round)
            state = client.sync([w + delta for w in state.weights], num_examples=args.examples,
                                loss=1.0, accuracy=0.5)


if __name__ == "__main__":
    main()
