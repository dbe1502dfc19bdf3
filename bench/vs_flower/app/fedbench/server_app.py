"""The ServerApp: example-weighted FedAvg over every node, and the global model tested after each round.

``FedAvg`` is Flower's own; the subclass only records, per round, the
moment the new global model exists, the slowest node's local training
time, and the model bytes sent and received, for bench/flower.py to read
from ``record-path`` (JSON lines).
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedbench.task import build_model, load

app = ServerApp()


def _array_bytes(arrays: ArrayRecord) -> int:
    """The serialized tensor bytes a message carries (NumPy ``.npy`` form, as Flower ships them)."""
    return sum(len(array.data) for array in arrays.values())


class RecordingFedAvg(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds: dict[int, dict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"round": server_round, "bytes": len(messages) * _array_bytes(arrays)}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        record = self.rounds[server_round]
        record["closed"] = time.time()
        contents = [reply.content for reply in replies if reply.has_content()]
        record["bytes"] += sum(_array_bytes(content["arrays"]) for content in contents)
        if len(contents) < len(replies):
            errors = [str(reply.error) for reply in replies if reply.has_error()]
            raise RuntimeError(f"Round {server_round}: {len(errors)} ClientApps failed: {errors}")
        record["train_seconds"] = max(content["metrics"]["train-seconds"] for content in contents)
        record["updates"] = len(contents)
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    workers = config["num-workers"]
    model = build_model(config["seed"], config["learning-rate"])
    x_test, y_test = load(config["data-path"], "test")
    # Every node trains every round, and FedAvg weights by "num-examples" (the
    # examples trained this round, as coMind weights). No federated evaluation:
    # coMind tests only the global model, centrally, as evaluate_fn does here.
    strategy = RecordingFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=workers,
                               min_available_nodes=workers)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # coMind does not test the initial model either
        model.set_weights(arrays.to_numpy_ndarrays())
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=1024, verbose=0)
        record = {**strategy.rounds[server_round], "evaluated": time.time(), "loss": loss, "accuracy": accuracy}
        with open(config["record-path"], "a") as file:
            file.write(json.dumps(record) + "\n")
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.get_weights()),
                       num_rounds=config["num-server-rounds"], evaluate_fn=evaluate)
    except Exception:
        # The bench watches this file, not the ServerApp process (the SuperLink starts that one).
        with open(config["record-path"], "a") as file:
            file.write(json.dumps({"failed": traceback.format_exc()}) + "\n")
        raise
